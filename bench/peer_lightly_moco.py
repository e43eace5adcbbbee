"""lightly's CIFAR-10 MoCo example, time-boxed: the peer that bench/learn_cifar.py --peer lightly runs beside ours.

Runs in its own venv with lightly 1.6 (bench/cifar_peer.py makes it); imports nothing of mocostream.
The example is lightly's tutorial "Train MoCo on CIFAR-10" (tutorial_moco_memory_bank.py): MoCoV2Transform at
32 px without blur, ResNetGenerator("resnet-18", num_splits=8) (SplitBatchNorm: Shuffle BN's stand-in on one
device) and batch_shuffle of the keys, MoCoProjectionHead(features, 512, 128), NTXentLoss with T 0.1 and a
memory bank of 4,096, m 0.99, SGD lr 0.06 momentum 0.9 weight decay 5e-4, cosine lr. Changed for the
comparison, and only these: the network is the example's ResNet at `--width` 0.5, which is our
resnet18_cifar_half (the same layers and parameter count; the tutorial's nn.Sequential of the ResNet's
children would skip its functional stem ReLU, so the ResNet's own forward is used, with `linear` removed);
batch 128; the cosine follows the clock of a `--budget-minutes` run (as ours: the loop's time, first batch
included) instead of epochs; a plain PyTorch loop instead of the tutorial's Lightning Trainer; torch threads =
the CPUs this process may use (pin it with taskset).

Writes to --out: snapshot-<step>.pt at step 0, at each --snapshot-minutes mark of the clock (the first step
after it) and at the end: the query backbone in torchvision's ResNet names (`shortcut` -> `downsample`, the
split BN statistics averaged as lightly's eval mode does), plain tensors; and summary.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn


def build(width: float, num_splits: int):
    """(backbone, head, momentum backbone, momentum head), as the example builds them."""
    from lightly.models import ResNetGenerator
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad

    backbone = ResNetGenerator("resnet-18", width=width, num_splits=num_splits)
    features = backbone.linear.in_features
    backbone.linear = nn.Identity()  # the ResNet's forward: stem ReLU, avg-pool, flatten; no classifier
    head = MoCoProjectionHead(features, 512, 128)
    backbone_m, head_m = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_m)
    deactivate_requires_grad(head_m)
    return backbone, head, backbone_m, head_m


def torchvision_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights under torchvision's ResNet names; SplitBatchNorm keeps one set of running
    statistics per split: averaged, which is what lightly's own eval mode uses."""
    out = {}
    for name, value in backbone.state_dict().items():
        module = backbone.get_submodule(name.rpartition(".")[0])
        splits = getattr(module, "num_splits", 0)
        if splits and name.endswith(("running_mean", "running_var")):
            value = value.view(splits, -1).mean(0)
        out[name.replace(".shortcut.", ".downsample.")] = value.detach().clone()
    return out


def snapshot(out: Path, backbone: nn.Module, step: int, images: int, seconds: float) -> dict:
    path = out / f"snapshot-{step:07d}.pt"
    torch.save({"backbone": torchvision_state(backbone), "step": step, "images": images, "train_seconds": seconds},
               path)
    return {"path": str(path), "step": step, "images": images, "train_seconds": seconds}


def loader(data: str, batch_size: int, workers: int, seed: int):
    from lightly.data import LightlyDataset
    from lightly.transforms import MoCoV2Transform

    dataset = LightlyDataset(input_dir=data, transform=MoCoV2Transform(input_size=32, gaussian_blur=0.0))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, persistent_workers=workers > 0,
                                       generator=torch.Generator().manual_seed(seed))


def batches(data_loader):
    while True:  # epochs until the budget ends the run
        yield from data_loader


def train(args) -> dict:
    from lightly.loss import NTXentLoss
    from lightly.models.utils import batch_shuffle, batch_unshuffle, update_momentum

    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backbone, head, backbone_m, head_m = build(args.width, args.num_splits)
    criterion = NTXentLoss(temperature=0.1, memory_bank_size=(4096, 128))
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-4)
    data_loader = loader(args.data, args.batch_size, args.workers, args.seed)
    budget = 60 * args.budget_minutes
    snapshots, rates, losses = [snapshot(out, backbone, 0, 0, 0.0)], [], []
    step, next_mark, t_log = 0, 60 * args.snapshot_minutes, 0.0
    t0 = time.perf_counter()
    for (x_q, x_k), _, _ in batches(data_loader):
        spent = time.perf_counter() - t0
        if (spent >= budget and step) or step == args.max_steps:
            break
        for group in optimizer.param_groups:  # the example's cosine, on the clock
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, spent / budget)))
        update_momentum(backbone, backbone_m, 0.99)
        update_momentum(head, head_m, 0.99)
        q = head(backbone(x_q).flatten(start_dim=1))
        k, shuffle = batch_shuffle(x_k)
        with torch.no_grad():
            k = batch_unshuffle(head_m(backbone_m(k).flatten(start_dim=1)), shuffle)
        loss = criterion(q, k)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        now = time.perf_counter() - t0
        if step % args.log_every == 0:
            rates.append(args.log_every * args.batch_size / (now - t_log))
            losses.append(loss.item())
            t_log = now
            print(f"step {step} | {rates[-1]:.1f} img/s | loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
        if args.snapshot_minutes and now >= next_mark:
            snapshots.append(snapshot(out, backbone, step, step * args.batch_size, now))
            next_mark += 60 * args.snapshot_minutes
    seconds = time.perf_counter() - t0
    if step and step % args.log_every:
        losses.append(loss.item())  # the last step's, whether or not it was a log step
    if snapshots[-1]["step"] != step:
        snapshots.append(snapshot(out, backbone, step, step * args.batch_size, seconds))
    return summary(args, backbone, step, seconds, rates, losses, snapshots)


def summary(args, backbone: nn.Module, step: int, seconds: float, rates: list, losses: list,
            snapshots: list) -> dict:
    import lightly

    images = step * args.batch_size
    return {"peer": f"lightly {lightly.__version__}", "step": step, "images": images, "train_seconds": seconds,
            "images_per_second": images / max(seconds, 1e-9), "rates": rates, "log_every": args.log_every,
            "loss": losses[-1] if losses else None, "threads": torch.get_num_threads(),
            "backbone_parameters": sum(p.numel() for p in backbone.parameters()),
            "torch": torch.__version__, "snapshots": snapshots}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a folder of images (class subfolders allowed): CIFAR-10 train/")
    p.add_argument("--out", required=True, help="folder for the snapshots and summary.json")
    p.add_argument("--budget-minutes", type=float, required=True)
    p.add_argument("--snapshot-minutes", type=float, default=0, help="backbone snapshots every this many minutes")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.06)
    p.add_argument("--width", type=float, default=0.5, help="ResNet-18 width (0.5: our resnet18_cifar_half)")
    p.add_argument("--num-splits", type=int, default=8, help="SplitBatchNorm splits (the example's 8)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: the budget only)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.batch_size % max(args.num_splits, 1):
        sys.exit(f"--batch-size {args.batch_size} must be a multiple of --num-splits {args.num_splits}")
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the CPUs taskset gave this process
    result = train(args)
    (Path(args.out) / "summary.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
