"""Timing MoCo training steps for the step benchmarks (moco_step, split_bn, compile_step).

Variants are timed in alternating rounds, so the noise of these shared machines hits all of them alike; the
scripts compare medians.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from mocostream.moco_core import info_nce


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn, the device's queued work included."""
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def moco_train_step(model, opt, im_q: torch.Tensor, im_k: torch.Tensor, bf16: bool) -> None:
    """One step as the trainer takes it: forward (bf16 autocast if asked), InfoNCE in fp32, backward, SGD."""
    with torch.autocast(im_q.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits, labels = model(im_q, im_k)
        loss = info_nce(logits.float(), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def alternating_rounds(steps: dict[str, Callable[[], object]], device: torch.device, rounds: int,
                       per_round: int) -> dict[str, float]:
    """Median step time of each variant over `rounds` rounds of `per_round` steps each, printing every round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name, fn in steps.items():
            times[name] += timed(fn, device, per_round)
        print(f"round {r + 1}: " + ", ".join(f"{k} {statistics.median(v[-per_round:]) * 1e3:.0f} ms"
                                             for k, v in times.items()), flush=True)
    return {k: statistics.median(v) for k, v in times.items()}
