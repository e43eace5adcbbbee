"""The loader's bookkeeping, one stage shared by both backends: which samples make a batch, with which
augmentation seed, what was skipped and why, and what is left over at the end of a finite run.

A backend (pipeline.backends: DALI, or OpenCV worker processes) only turns chunks of samples into two augmented
views. Around it this stage
  - cuts the stream into chunks of `batch_size` samples, leaving out the ones already known to be bad (DALI's
    pre-flight check), each with a seed derived from where its first sample sits in the stream: a sample's
    views then depend on the data position only, not on threads, workers, prefetching or restarts;
  - counts every skipped sample by reason (the stream's `skipped`, which metrics export) and logs its key
    (aggregated by SkipLog);
  - assembles what the backend returns into batches of exactly `batch_size` (every step on every rank has the
    same shape) and counts the tail that cannot fill one as `partial_last_batch` (only with a finite --epochs);
  - gives each batch its last sample: once the batch is consumed, the resume state starts after it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from .skip_log import SkipLog
from .stream import Item, SampleStream


@dataclass
class Batch:
    q: torch.Tensor  # (B, 3, S, S) float, normalised
    k: torch.Tensor
    keys: list[str]
    last: Item | None = None  # its last sample: marking it consumed moves the resume state past the batch


@dataclass
class Chunk:
    """Samples a backend augments together, with the seed of their augmentation."""
    items: list[Item]
    seed: int


@dataclass
class Views:
    """A backend's answer for a chunk: q and k rows for the samples it could augment, in chunk order, and per
    sample of the chunk None or the reason it was skipped (reasons None: none was)."""
    items: list[Item]
    q: Any  # (n, 3, S, S): numpy uint8 (torch workers) or a float tensor (DALI); `collate` makes them a batch
    k: Any
    reasons: list[str | None] | None = None


def position_seed(seed: int, rank: int, epoch: int, position: int) -> int:
    """An augmentation seed that is a function of a position in the data stream."""
    return hash((seed, rank, epoch, position)) & 0x7FFFFFFF


def batch_seed(seed: int, rank: int, first: Item) -> int:
    """The augmentation seed of a chunk: a function of where its first sample sits in the stream."""
    return position_seed(seed, rank, first.epoch, first.position)


class Batcher:
    def __init__(self, stream: SampleStream, batch_size: int, seed: int, rank: int, skip_log: SkipLog):
        self.stream, self.batch_size, self.seed, self.rank, self.skip_log = stream, batch_size, seed, rank, skip_log
        self.unfed = 0  # samples of a short last chunk held back from a backend that takes whole batches only

    def skip(self, item: Item, reason: str) -> None:
        """A sample that cannot be used: counted every time, logged (aggregated) with its key."""
        self.stream.count(reason)
        self.skip_log.note(reason, item.sample.key)

    def lost(self, reason: str, n: int) -> None:
        """Samples lost together without a key each (a failed DALI run): counted."""
        self.stream.count(reason, n)

    def chunks(self, checked: Iterable[tuple[Item, str | None]], whole: bool) -> Iterator[Chunk]:
        """(item, reason or None) -> chunks of `batch_size` usable samples, each with its augmentation seed.
        The last chunk may be short; with `whole` it is held back (DALI runs whole batches only) and counted
        with the partial last batch."""
        chunk: list[Item] = []
        for item, reason in checked:
            if reason is not None:
                self.skip(item, reason)
                continue
            chunk.append(item)
            if len(chunk) == self.batch_size:
                yield Chunk(chunk, batch_seed(self.seed, self.rank, chunk[0]))
                chunk = []
        if chunk and whole:
            self.unfed = len(chunk)
        elif chunk:
            yield Chunk(chunk, batch_seed(self.seed, self.rank, chunk[0]))

    def batches(self, views: Iterable[Views], collate: Callable[[Any], torch.Tensor]) -> Iterator[Batch]:
        """The backend's views -> batches of exactly `batch_size`; samples it rejected are skipped, and when the
        views run out (only with a finite --epochs) the tail that cannot fill a batch is counted."""
        ready: list[tuple[Any, Any, Item]] = []  # augmented rows not yet in a batch
        for v in views:
            good = self._accepted(v)
            if not ready and len(good) == self.batch_size:  # the usual case: the chunk is the batch, no copy
                yield Batch(collate(v.q), collate(v.k), [it.sample.key for it in good], good[-1])
                continue
            ready += zip(v.q, v.k, good)
            while len(ready) >= self.batch_size:
                rows, ready = ready[:self.batch_size], ready[self.batch_size:]
                yield self._batch(rows, collate)
        if ready or self.unfed:
            self.stream.count("partial_last_batch", len(ready) + self.unfed)

    def _accepted(self, v: Views) -> list[Item]:
        """The chunk's samples that have views; the others counted and logged by reason."""
        if v.reasons is None:
            return v.items
        for item, reason in zip(v.items, v.reasons):
            if reason is not None:
                self.skip(item, reason)
        return [item for item, reason in zip(v.items, v.reasons) if reason is None]

    @staticmethod
    def _batch(rows: list[tuple[Any, Any, Item]], collate: Callable[[Any], torch.Tensor]) -> Batch:
        stack = torch.stack if isinstance(rows[0][0], torch.Tensor) else np.stack
        return Batch(collate(stack([r[0] for r in rows])), collate(stack([r[1] for r in rows])),
                     [r[2].sample.key for r in rows], rows[-1][2])
