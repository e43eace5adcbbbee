"""The training step's numeric precision: fp32, bf16 autocast, or fp16 autocast with a gradient scaler
(for GPUs without bf16, such as V100 and T4). Parameters, optimizer state and checkpoints stay fp32.

With fp16 there is one decision per step about skipping it: the gradients are unscaled first, the
non-finite guard looks at them (an fp16 overflow shows up as inf/NaN there), the fused SGD skips on the guard's
flag, and the scaler, having checked the same unscaled gradients, halves its scale on that same step. So an
overflow step is skipped once and counted once (`mocostream_nonfinite_steps_total`). The guard also clips
the gradients (--clip-grad), so clipping always sees true, unscaled gradients.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # listed by the command line, which must not load torch for it


def precision_mode(precision: str, device: torch.device) -> str:
    """fp32, bf16 or fp16. `auto`: on CUDA bf16 where the GPU supports it, else fp16; fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


class StepPrecision:
    def __init__(self, precision: str, device: torch.device):
        import torch

        self.mode = precision_mode(precision, device)
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type) if self.mode == "fp16" else None

    @property
    def channels_last(self) -> bool:
        """oneDNN (CPU) and cuDNN run reduced-precision convolutions fastest in NHWC."""
        return self.mode != "fp32"

    def autocast(self):
        import torch

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mode)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, guard, params) -> None:
        """Backward, the non-finite guard (and gradient clipping), the optimizer step (skipped on the device if
        not finite)."""
        if self.scaler is None:
            loss.backward()
            guard.before_step(optimizer, params)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)  # true gradients: inf/NaN where the scaled fp16 backward overflowed
        guard.before_step(optimizer, params)  # the one skip decision, counted once; clipping the true gradients
        optimizer.step()  # fused SGD: skipped on the device when the guard flagged the step
        self.scaler.update()  # its own check saw the same gradients: the scale halves on that same step

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)
