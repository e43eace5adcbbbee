"""Learning rate and optimizer, as in the reference recipe: SGD, lr 0.03 per 256 images, cosine decay."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule: base_lr is the rate for a global batch of 256 (the reference's 0.03 x batch/256)."""
    return base_lr * global_batch / 256


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
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, lr: float, momentum: float = 0.9,
                    weight_decay: float = 1e-4) -> torch.optim.SGD:
    """SGD over the trainable parameters only: the key encoder moves by momentum, not by gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
