"""The MoCo objective as small pure functions of the logits from `MoCo.forward` (positive key in column 0)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """InfoNCE, -log exp(q.k+/T) / sum_i exp(q.k_i/T): a (1+K)-way cross entropy with the positive as class 0."""
    return F.cross_entropy(logits, labels)


def instance_accuracy(logits: torch.Tensor) -> torch.Tensor:
    """Fraction of queries whose positive key scores above every negative; a 0-dim tensor (no host sync)."""
    return (logits.argmax(dim=1) == 0).float().mean()
