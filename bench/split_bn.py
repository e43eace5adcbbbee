"""Single-device Shuffle BN in channels_last memory: the NHWC kernel vs the reshape path vs no Shuffle BN.

    python bench/split_bn.py                       # resnet18_cifar_half, 32 px, batch 128, bf16 on CPU (AMX)
    python bench/split_bn.py --device cuda --arch resnet50 --image-size 224 --batch-size 256

One MoCo training step (bf16 autocast, channels_last), three ways:
* nhwc: `SplitBatchNorm2d` as shipped: statistics per (sub-batch, channel) computed in NHWC memory;
* reshape: the NCHW route forced on the same tensors: view the batch as N/s samples of s x C channels, which in
  channels_last memory costs a copy in and out of every BN layer (what `SplitBatchNorm2d` did before);
* plain: `bn_splits` 1, i.e. no Shuffle BN at all (the ceiling; it lets BN leak the positive pair).
Rounds alternate the three so machine noise hits all of them; medians are compared.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mocostream.moco_core.split_bn as split_bn  # noqa: E402
from mocostream.moco_core import MoCo, build_encoder, build_optimizer  # noqa: E402
from step_timing import alternating_rounds, moco_train_step, timed  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18_cifar_half")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--K", type=int, default=4096)
    p.add_argument("--bn-splits", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="steps per round and variant")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    n, size = args.batch_size, args.image_size
    images = [torch.randn(n, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
              for _ in range(2)]
    nhwc_check = split_bn._is_nhwc

    def model(splits: int):
        torch.manual_seed(0)
        m = MoCo(build_encoder(args.arch), dim=128, K=args.K, m=0.99, T=0.2, mlp=True, bn_splits=splits)
        m = m.to(device).to(memory_format=torch.channels_last).train()
        return m, build_optimizer(m, 0.03)

    variants = {"nhwc": (model(args.bn_splits), nhwc_check), "reshape": (model(args.bn_splits), lambda x: False),
                "plain": (model(1), nhwc_check)}

    def step(name: str) -> None:
        (m, opt), route = variants[name]
        split_bn._is_nhwc = route
        moco_train_step(m, opt, *images, bf16=True)

    steps = {name: partial(step, name) for name in variants}
    for fn in steps.values():  # warm-up: allocator, oneDNN/cuDNN plans
        timed(fn, device, 2)
    med = alternating_rounds(steps, device, args.rounds, args.steps)
    split_bn._is_nhwc = nhwc_check
    print(f"\n{args.arch}, {size} px, batch {n}, K {args.K}, bn_splits {args.bn_splits}, bf16 + channels_last, "
          f"{device}, {torch.get_num_threads()} threads")
    print("| MoCo step | median | img/s | vs nhwc |\n| --- | ---: | ---: | ---: |")
    for k, v in med.items():
        print(f"| {k} | {v * 1e3:.1f} ms | {n / v:.0f} | {v / med['nhwc']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
