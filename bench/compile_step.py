"""`--compile`: the MoCo training step eager vs torch.compile'd encoders, in one process.

    python bench/compile_step.py                    # resnet18_cifar_half, 24 px, batch 128, K 4096, bf16, CPU
    python bench/compile_step.py --device cuda --arch resnet18_cifar --image-size 32 --batch-size 512

Both models are built as the trainer builds them (`ops.train.build_model`: Shuffle BN, channels_last under bf16)
and take the same synthetic batch; rounds alternate eager / compiled so machine noise hits both, and the medians
are compared. The first compiled steps (compilation) are timed apart: the trainer pays them inside its run.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mocostream.moco_core import build_optimizer  # noqa: E402
from mocostream.ops.config import build_config  # noqa: E402
from mocostream.ops.train import build_model, uses_bf16  # noqa: E402
from step_timing import alternating_rounds, moco_train_step, timed  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18_cifar_half")
    p.add_argument("--image-size", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--K", type=int, default=4096)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=5, help="steps per round and side")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)

    def make(compile_: bool):
        cfg = build_config({}, dict(data="-", arch=args.arch, image_size=args.image_size, batch_size=args.batch_size,
                                    queue_size=args.K, precision=args.precision, compile=compile_, metrics_port=0))
        model = build_model(cfg, 1, device).train()
        return model, build_optimizer(model, 0.03), uses_bf16(cfg, device)

    models = {"eager": make(False), "compiled": make(True)}
    n, size = args.batch_size, args.image_size
    fmt = torch.channels_last if models["eager"][2] else torch.contiguous_format
    im_q = torch.randn(n, 3, size, size, device=device).contiguous(memory_format=fmt)
    im_k = torch.randn(n, 3, size, size, device=device).contiguous(memory_format=fmt)

    steps = {name: partial(moco_train_step, model, opt, im_q, im_k, bf16)
             for name, (model, opt, bf16) in models.items()}
    # compilation (forward, backward, the momentum-updated key), timed apart
    first = sum(timed(steps["compiled"], device, 3))
    timed(steps["eager"], device, 1)
    med = alternating_rounds(steps, device, args.rounds, args.steps)
    eager, compiled = med["eager"], med["compiled"]
    print(f"\n{args.arch}, {size} px, batch {n}, K {args.K}, {args.precision}, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| figure | value |\n| --- | ---: |")
    print(f"| first 3 compiled steps (compilation) | {first:.1f} s |")
    print(f"| MoCo step, eager | {eager * 1e3:.0f} ms ({n / eager:.0f} img/s) |")
    print(f"| MoCo step, compiled | {compiled * 1e3:.0f} ms ({n / compiled:.0f} img/s) |")
    print(f"| **eager / compiled** | **{eager / compiled:.2f}x** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
