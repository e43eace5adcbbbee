"""The loader: a rank's sample stream -> batches of two augmented views (q, k) with their keys.

The stream (SampleStream: the rank's share, resume state) -> one bookkeeping stage (batching.Batcher: chunks,
their augmentation seeds, skip counts and logs, batches of exactly `batch_size`, the partial last batch) around
one of two backends (backends.py), which only turn chunks of samples into two augmented views:
  - `dali`:   DALI decodes and augments (GPU when there is one, CPU otherwise), fed by external_source.
  - `opencv`: OpenCV (and PIL's resize) in worker processes, the DALI graph's views (augment_cv.py).
  - `auto` picks one: DALI for a GPU, OpenCV on CPU, where it is the faster (vocabulary.pick_backend).
A sample that cannot be decoded is skipped and counted; batches always hold exactly `batch_size`
samples, so every step on every rank has the same shape.

DALI fails a whole batch on one bad image, so by default (`preflight="auto"`) every image is checked first
(image_check.check_image, ~0.7 CPU-ms each) unless the shards' manifest carries the stamp `shards create`
writes after validating them with the same rules (image_check.trusted): at a few thousand images/s per GPU
that check alone would need several cores. If a bad image slips through anyway, its batch fails inside
DALI, the pipeline is rebuilt and the batch's samples are counted as `decoder_error`.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .backends import DaliViews, OpenCVViews
from .batching import Batch, Batcher
from .selection import load_table
from .shard_table import ShardTable
from .skip_log import SkipLog
from .sources import Shard, with_counts
from .storage import ShardReader, Storage, StorageConfig, StorageObserver
from .stream import SampleStream
from .vocabulary import BACKEND_CHOICES, BACKENDS, DALI, OPENCV, PREFLIGHT, RECIPES, alias_notice, pick_backend

log = logging.getLogger(__name__)


class LoaderConfigError(ValueError):
    """A bad loader setting; reported in one line."""

    user_error = True


@dataclass
class LoaderConfig:
    data: str
    batch_size: int = 32
    image_size: int = 224
    recipe: str = "moco_v2"
    backend: str = "auto"  # auto | dali | opencv
    seed: int = 0
    rank: int = 0
    world: int = 1
    workers: int = 2  # opencv: augmentation processes; dali: CPU threads
    device: str = "cpu"  # "cpu" | "gpu"
    device_id: int | None = None
    shuffle_shards: int = 4
    read_ahead: int = 2  # shard blocks fetched ahead of use
    read_ahead_bytes: int = 1 << 30  # ... and at most this many bytes of them in flight
    epochs: int | None = None  # None: endless
    storage: StorageConfig = field(default_factory=StorageConfig)
    # dali: check every image before it reaches DALI? auto: not for shards `shards create` validated
    preflight: str = "auto"


class TwoViewLoader:
    def __init__(self, cfg: LoaderConfig, shards: list[Shard] | None = None,
                 observer: StorageObserver | None = None, share=None, storage: Storage | None = None):
        """`storage`: the caller's (the trainer's, for its start-up calls too), with `cfg.storage` as config;
        default: one built from `cfg.storage`."""
        self.backend, why = pick_backend(cfg.backend, on_gpu=cfg.device == "gpu")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {cfg.backend!r}; choose from {', '.join(BACKEND_CHOICES)}")
        if cfg.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {cfg.recipe!r}; choose from {', '.join(RECIPES)}")
        if cfg.batch_size < 1 or cfg.image_size < 8:
            raise ValueError("batch_size must be >= 1 and image_size >= 8")
        if cfg.preflight not in PREFLIGHT:
            raise LoaderConfigError(f"unknown pre-flight check mode {cfg.preflight!r}; "
                                    f"choose from {', '.join(PREFLIGHT)}")
        if storage is not None and storage.config != cfg.storage:
            raise ValueError("the loader's storage must have the loader's storage config")
        self.cfg, self.storage = cfg, storage or Storage(cfg.storage)
        # share: run a function on one rank, give all its result (a shard list without manifest is counted once)
        missing = observer.failed if observer is not None else None  # a missing shard is a failed one
        shards = (ShardTable.from_shards(with_counts(shards, storage=self.storage, on_missing=missing))
                  if shards is not None else load_table(cfg.data, share, missing, storage=self.storage))
        self.skip_log = SkipLog(log)
        self.preflight = needs_preflight(cfg.preflight, shards.validated_by)
        if alias_notice(cfg.backend):
            log.warning(alias_notice(cfg.backend))
        log.info("augmentation backend: %s (%s)", self.backend, why)  # once the data is found: bad input stays one line
        if self.backend == DALI:
            log.info("pre-flight image check: %s",
                     "on" if self.preflight else "off (shards validated by shards create)")
        self.stream = SampleStream(shards, seed=cfg.seed, world=cfg.world, rank=cfg.rank,
                                   shuffle_shards=cfg.shuffle_shards, read_ahead=cfg.read_ahead,
                                   read_ahead_bytes=cfg.read_ahead_bytes, epochs=cfg.epochs,
                                   reader=ShardReader(self.storage, observer))

    def interrupt_when(self, interrupted: Callable[[], bool]) -> None:
        """While a batch is awaited, `interrupted()` is looked at twice a second: once true, the wait ends in
        `Interrupted` (the trainer's SIGTERM: a stalled read must not hold back its checkpoint)."""
        self.stream.interrupted = interrupted

    # Resume state: the stream position after the last batch handed out.
    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    @property
    def skipped(self) -> Counter:
        return self.stream.skipped

    def position_state(self) -> list[int]:
        return self.stream.position_state()

    def checkpoint_state(self, positions: list[list[int]]) -> dict:
        """Every rank's state (rank 0 has gathered their positions): small at any number of ranks."""
        return self.stream.checkpoint_state(positions)

    def load_states(self, states) -> None:
        """Resume from every rank's saved state (elastic when the number of ranks changed)."""
        self.stream.load_states(states)

    @property
    def epoch_progress(self) -> tuple[int, float]:
        return self.stream.epoch, self.stream.progress()

    def __iter__(self) -> Iterator[Batch]:
        cfg = self.cfg
        batcher = Batcher(self.stream, cfg.batch_size, cfg.seed, cfg.rank, self.skip_log)
        backend = self._backend(batcher)
        checked = backend.checked(self.stream)
        chunks = batcher.chunks(checked, whole=backend.whole_batches)
        try:
            yield from batcher.batches(backend.views(chunks), backend.collate)
        finally:
            chunks.close()
            checked.close()  # stops the stream's reads
            backend.close()
            self.skip_log.flush()

    def _backend(self, batcher: Batcher) -> OpenCVViews | DaliViews:
        cfg = self.cfg
        if self.backend == OPENCV:
            return OpenCVViews(cfg.recipe, cfg.image_size, cfg.workers, self.stream.interrupted)
        return DaliViews(batch_size=cfg.batch_size, image_size=cfg.image_size, recipe=cfg.recipe, device=cfg.device,
                         device_id=cfg.device_id, threads=max(1, cfg.workers), seed=cfg.seed * 1000 + cfg.rank,
                         preflight=self.preflight, lost=batcher.lost, interrupted=self.stream.interrupted)

    def consumed(self, batch: Batch) -> None:
        """Call once a batch has been trained on: the resume state then starts after it."""
        self.stream.mark_consumed(batch.last)


def needs_preflight(mode: str, validated_by: dict | None) -> bool:
    """always / never as asked; auto: unless the shards' manifest carries the validation stamp written by
    `shards create` and it covers what the check would find."""
    from .image_check import trusted

    return mode == "always" if mode != "auto" else not trusted(validated_by)
