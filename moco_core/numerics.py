"""Numerical safety of a training step, decided on the device so the step needs no host sync.

A step whose gradients are not finite (a NaN/inf loss gives NaN gradients) is skipped by the fused SGD
(`optimizer.found_inf`); the counts stay on the device until the trainer reads them at a log step.
Under DDP the gradients are all-reduced first, so every rank makes the same decision.

Gradient clipping (off unless asked: the MoCo references do not clip) reuses the guard's total norm: the
gradients are scaled by min(1, clip_norm / norm), again without a host sync. `grad_norm` stays the norm before
clipping, which is what shows how far a step wanted to go. A non-finite norm makes the scaled gradients NaN too,
but that step is skipped anyway.
"""
from __future__ import annotations

import torch


class NonFiniteError(RuntimeError):
    user_error = True  # a clear one-line error, not a traceback


class NonFiniteGuard:
    def __init__(self, device: torch.device, max_in_a_row: int, clip_norm: float = 0.0):
        self.max_in_a_row = max_in_a_row
        self.clip_norm = clip_norm  # 0: no clipping
        self.skipped = torch.zeros((), device=device)  # steps skipped since the last `check`
        self.run = torch.zeros((), device=device)  # current run of consecutive skipped steps
        self.longest = torch.zeros((), device=device)  # longest run since the last `check`
        self.grad_norm = torch.zeros((), device=device)  # of the latest step

    def before_step(self, optimizer: torch.optim.Optimizer, params) -> None:
        """Call after backward (and after unscaling fp16 gradients), before `optimizer.step()`: tells the
        optimizer whether to skip, and clips the gradients to `clip_norm` if that is set."""
        params = list(params)
        self.grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        bad = (~torch.isfinite(self.grad_norm)).float()
        optimizer.found_inf = bad
        self.skipped += bad
        self.run = (self.run + 1) * bad
        self.longest = torch.maximum(self.longest, self.run)
        if self.clip_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.clip_norm, self.grad_norm)

    def check(self) -> int:
        """At log steps (a host sync): the number of skipped steps since the last check; raises after
        `max_in_a_row` skipped steps in a row."""
        skipped, longest = int(self.skipped.item()), int(self.longest.item())
        self.skipped.zero_()
        self.longest.copy_(self.run)
        if self.max_in_a_row and longest >= self.max_in_a_row:
            raise NonFiniteError(f"{longest} training steps in a row had a non-finite loss or gradient; "
                                 f"stopping (lower --base-lr, check the data, or raise --max-nonfinite-steps)")
        return skipped
