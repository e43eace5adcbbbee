"""Learning rate, key-encoder momentum and optimizer, as in the reference recipes: SGD, lr 0.03 per 256
images, step decay (MoCo v1) or cosine decay (v2), optional warmup; momentum constant or cosine to 1;
MoCo v3: LARS (ResNets) or AdamW (ViTs), warmup then cosine, momentum cosine to 1.

A run is planned in steps (`cosine_lr`, `step_lr`: progress = step / total_steps) or in wall-clock time
(`budget_lr`: progress = seconds trained / budget), so a time-boxed run ends its schedule with its budget
whatever the machine's speed."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads in build_optimizer: the command line reads the schedule names without it
    import torch
    import torch.nn as nn


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule: base_lr is the rate for a global batch of 256 (the reference's 0.03 x batch/256)."""
    return base_lr * global_batch / 256


def cosine_decay(progress: float) -> float:
    """The cosine schedule's factor: a half cosine from 1 at progress 0 to 0 at progress 1 (and after)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def step_decay(progress: float, milestones: tuple[float, ...] = (0.6, 0.8)) -> float:
    """MoCo v1's factor: x0.1 at each milestone, given as fractions of the run (the reference's epochs
    120 and 160 of 200)."""
    return 0.1 ** sum(progress >= f for f in milestones)


def cosine_lr(peak_lr: float, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """lr for `step` (0-based): linear warmup from 0 to peak_lr over warmup_steps, then a half cosine from
    peak_lr to 0 at total_steps; 0 after total_steps (a stream may run past its plan).

    With warmup_steps=0 this is the reference `adjust_learning_rate` with --cos, per step instead of per epoch.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    return peak_lr * cosine_decay((step - warmup_steps) / max(1, total_steps - warmup_steps))


def step_lr(peak_lr: float, step: int, total_steps: int, warmup_steps: int = 0,
            milestones: tuple[float, ...] = (0.6, 0.8)) -> float:
    """MoCo v1's schedule (`step_decay`, milestones at whole steps) after the same linear warmup as `cosine_lr`."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    return peak_lr * step_decay(step, tuple(round(f * total_steps) for f in milestones))


LR_SCHEDULES = {"cosine": cosine_lr, "step": step_lr}
DECAYS = {"cosine": cosine_decay, "step": step_decay}


def budget_lr(peak_lr: float, schedule: str, step: int, warmup_steps: int, progress: float) -> float:
    """lr of a run bounded by wall clock, progress = seconds trained / budget: the same linear warmup over
    the first warmup_steps, then the schedule's decay at that progress. The decay counts from the start of
    the run, so the decay has begun when the warmup ends (cosine: by 0.2% after a warmup of 3% of the run)."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    return peak_lr * DECAYS[schedule](progress)


MOMENTUM_SCHEDULES = ("constant", "cosine")


def momentum_at(m: float, step: float, total_steps: float, schedule: str = "constant") -> float:
    """Key-encoder momentum at `step` of `total_steps` (or seconds trained of a budget in seconds): constant
    m (MoCo v1/v2), or a half cosine from m up to 1 at the end of the run (as BYOL and MoCo v3 do), so the
    key encoder settles as training ends."""
    if schedule == "constant":
        return m
    if schedule == "cosine":
        return 1.0 - (1.0 - m) * cosine_decay(step / total_steps if total_steps > 0 else 1.0)
    raise ValueError(f"unknown momentum schedule {schedule!r}; choose constant or cosine")


OPTIMIZERS = ("sgd", "lars", "adamw")


def build_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
                    name: str = "sgd") -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters only: the key encoder moves by momentum, not by gradient
    (and so do a ViT's frozen patch projection and position embedding).

    sgd: the MoCo v1/v2 recipes. lars: MoCo v3's for ResNets (optimizer.LARS). adamw: MoCo v3's for ViTs (betas
    0.9, 0.999, weight decay on every parameter, as the reference's torch.optim.AdamW). All three can skip a step
    on the device (`optimizer.found_inf`, see `numerics.NonFiniteGuard`) without a host sync: SGD and AdamW fused,
    LARS by its own where(). Their state starts at zero (what the first step computes anyway), so a skipped
    first step leaves nothing uninitialised behind; fused AdamW also takes its step count back on a skipped step.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if name == "lars":
        from .optimizer import LARS

        return LARS(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    if name != "sgd":
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)
    if momentum:
        for p in params:
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return opt
