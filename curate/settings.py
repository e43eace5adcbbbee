"""The select stage's settings, checked before any stage runs (a module that imports nothing heavy: the command
line checks them at once, without torch or faiss)."""
from __future__ import annotations

from dataclasses import dataclass

from .layout import CurateError


@dataclass
class SelectConfig:
    out: str
    keep_fraction: float | None = None
    target_size: int | None = None
    dedup_eps: float = 0.08  # README: what 0.05, 0.07, 0.08 and 0.1 did on the uncurated CIFAR collection
    seed: int = 0
    select_memory: int = 2 << 30  # bytes of embeddings per bucket
    work_dir: str | None = None  # default: DEST/.select-work (local DEST) or a temporary folder

    def check(self) -> None:
        if self.keep_fraction is not None and self.target_size is not None:
            raise CurateError("give --keep-fraction or --target-size, not both")
        if self.keep_fraction is not None and not 0 < self.keep_fraction <= 1:
            raise CurateError(f"--keep-fraction must be in (0, 1], got {self.keep_fraction}")
        if self.target_size is not None and self.target_size < 1:
            raise CurateError(f"--target-size must be >= 1, got {self.target_size}")
        if not 0 <= self.dedup_eps < 1:
            raise CurateError(f"--dedup-eps must be in [0, 1), got {self.dedup_eps}")
        if self.select_memory < 1 << 16:
            raise CurateError(f"--select-memory must be at least 65536 (bytes), got {self.select_memory}")
