"""MoCo's own cost: one MoCo training step vs the encoder work it cannot avoid, and the fused momentum update.

    python bench/moco_step.py                      # resnet18_cifar, 32 px, batch 128, K 16384, CPU
    python bench/moco_step.py --device cuda --arch resnet50 --image-size 224 --batch-size 256 --K 65536

Baseline: query forward + backward + key forward of the same encoder on the same batch, timed alone (plus
the same SGD step, reported separately). The MoCo step adds the momentum update, Shuffle BN, the queue
logits and the enqueue. Rounds alternate baseline / MoCo so machine noise hits both; the medians are compared.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mocostream.moco_core import MoCo, build_encoder, build_optimizer, info_nce  # noqa: E402
from step_timing import timed  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18_cifar")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--K", type=int, default=16384)
    p.add_argument("--bn-splits", type=int, default=0, help="single-device Shuffle BN sub-batches (0: the trainer's auto)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per round and side")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.bn_splits == 0:
        from mocostream.ops.config import TrainConfig
        from mocostream.ops.train import auto_bn_splits

        args.bn_splits = auto_bn_splits(TrainConfig(data="-", batch_size=args.batch_size), 1)
    torch.manual_seed(0)
    n, size = args.batch_size, args.image_size
    im_q = torch.randn(n, 3, size, size, device=device)
    im_k = torch.randn(n, 3, size, size, device=device)

    model = MoCo(build_encoder(args.arch), dim=128, K=args.K, m=0.999, T=0.2, mlp=True,
                 bn_splits=args.bn_splits).to(device).train()
    opt = build_optimizer(model, 0.03)

    # the baseline: the same two encoders, used plainly
    enc_q, enc_k = model.encoder_q, model.encoder_k
    opt_base = build_optimizer(enc_q, 0.03)

    def baseline_step():
        q = F.normalize(enc_q(im_q), dim=1)
        with torch.no_grad():
            k = F.normalize(enc_k(im_k), dim=1)
        loss = -(q * k).sum(1).mean()  # a loss of the same shape of graph, without the queue
        opt_base.zero_grad(set_to_none=True)
        loss.backward()

    def baseline_step_sgd():
        baseline_step()
        opt_base.step()

    def moco_step():
        logits, labels = model(im_q, im_k)
        loss = info_nce(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for fn in (baseline_step_sgd, moco_step):  # warm-up: allocator, oneDNN/cuDNN plans
        timed(fn, device, 2)
    base, base_sgd, moco = [], [], []
    for r in range(args.rounds):
        base += timed(baseline_step, device, args.steps)
        base_sgd += timed(baseline_step_sgd, device, args.steps)
        moco += timed(moco_step, device, args.steps)
        print(f"round {r + 1}: baseline {statistics.median(base[-args.steps:]) * 1e3:.1f} ms, "
              f"+SGD {statistics.median(base_sgd[-args.steps:]) * 1e3:.1f} ms, "
              f"MoCo {statistics.median(moco[-args.steps:]) * 1e3:.1f} ms", flush=True)
    b, bs, m = statistics.median(base), statistics.median(base_sgd), statistics.median(moco)

    # momentum update: fused (what MoCo does) vs a per-parameter Python loop
    params_q, params_k = list(enc_q.parameters()), list(enc_k.parameters())

    def fused():
        with torch.no_grad():
            model._momentum_update_key_encoder()

    def loop():
        with torch.no_grad():
            for pq, pk in zip(params_q, params_k):
                pk.data = pk.data * model.m + pq.data * (1.0 - model.m)

    fused_t = statistics.median(timed(fused, device, 30))
    loop_t = statistics.median(timed(loop, device, 30))

    print(f"\n{args.arch}, {size} px, batch {n}, K {args.K}, bn_splits {args.bn_splits}, {device}, "
          f"{torch.get_num_threads()} threads")
    print("| figure | value |\n| --- | ---: |")
    print(f"| query fwd+bwd + key fwd (baseline) | {b * 1e3:.1f} ms |")
    print(f"| baseline + SGD step | {bs * 1e3:.1f} ms |")
    print(f"| MoCo step (momentum, Shuffle BN, queue, loss, SGD) | {m * 1e3:.1f} ms |")
    print(f"| **MoCo / baseline** (target <= 1.10) | **{m / b:.3f}** |")
    print(f"| MoCo / (baseline + SGD) | {m / bs:.3f} |")
    print(f"| momentum update, fused / per-parameter loop | {fused_t * 1e3:.2f} / {loop_t * 1e3:.2f} ms "
          f"({loop_t / fused_t:.1f}x) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
