"""The loader: a rank's sample stream -> batches of two augmented views (q, k) with their keys.

Two backends share the stream, the batching and the resume state:
  - `dali`:  DALI decodes and augments (GPU when there is one, CPU otherwise), fed by external_source.
  - `torch`: PIL + torchvision in worker processes (the reference recipe).
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
import random
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from .shard_table import ShardTable, load_shard_table
from .skip_log import SkipLog
from .sources import Shard, with_counts
from .storage import ShardReader, StorageConfig, StorageObserver
from .stream import Item, SampleStream
from .worker_pool import augmentation_pool

log = logging.getLogger(__name__)

BACKENDS = ("dali", "torch")
RECIPES = ("moco_v1", "moco_v2")
PREFLIGHT = ("auto", "always", "never")


class LoaderConfigError(ValueError):
    """A bad loader setting; reported in one line."""

    user_error = True


@dataclass
class LoaderConfig:
    data: str
    batch_size: int = 32
    image_size: int = 224
    recipe: str = "moco_v2"
    backend: str = "dali"
    seed: int = 0
    rank: int = 0
    world: int = 1
    workers: int = 2  # torch: augmentation processes; dali: CPU threads
    device: str = "cpu"  # "cpu" | "gpu"
    device_id: int | None = None
    shuffle_shards: int = 4
    read_ahead: int = 2  # shard blocks fetched ahead of use
    read_ahead_bytes: int = 1 << 30  # ... and at most this many bytes of them in flight
    epochs: int | None = None  # None: endless
    storage: StorageConfig = field(default_factory=StorageConfig)
    # dali: check every image before it reaches DALI? auto: not for shards `shards create` validated
    preflight: str = "auto"


@dataclass
class Batch:
    q: torch.Tensor  # (B, 3, S, S) float, normalised
    k: torch.Tensor
    keys: list[str]
    last: Item | None = None  # its last sample: marking it consumed moves the resume state past the batch


class TwoViewLoader:
    def __init__(self, cfg: LoaderConfig, shards: list[Shard] | None = None,
                 observer: StorageObserver | None = None, share=None):
        if cfg.backend not in BACKENDS:
            raise ValueError(f"unknown backend {cfg.backend!r}; choose from {', '.join(BACKENDS)}")
        if cfg.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {cfg.recipe!r}; choose from {', '.join(RECIPES)}")
        if cfg.batch_size < 1 or cfg.image_size < 8:
            raise ValueError("batch_size must be >= 1 and image_size >= 8")
        if cfg.preflight not in PREFLIGHT:
            raise LoaderConfigError(f"unknown pre-flight check mode {cfg.preflight!r}; "
                                    f"choose from {', '.join(PREFLIGHT)}")
        self.cfg = cfg
        # share: run a function on one rank, give all its result (a shard list without manifest is counted once)
        missing = observer.failed if observer is not None else None  # a missing shard is a failed one
        shards = (ShardTable.from_shards(with_counts(shards, missing)) if shards is not None
                  else load_shard_table(cfg.data, share, missing))
        self.skip_log = SkipLog(log)
        self.preflight = needs_preflight(cfg.preflight, shards.validated_by)
        if cfg.backend == "dali":
            log.info("pre-flight image check: %s",
                     "on" if self.preflight else "off (shards validated by shards create)")
        self.stream = SampleStream(shards, seed=cfg.seed, world=cfg.world, rank=cfg.rank,
                                   shuffle_shards=cfg.shuffle_shards, read_ahead=cfg.read_ahead,
                                   read_ahead_bytes=cfg.read_ahead_bytes, epochs=cfg.epochs,
                                   reader=ShardReader(cfg.storage, observer))

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
        batches = self._dali_batches() if self.cfg.backend == "dali" else self._torch_batches()
        try:
            for batch, last in batches:
                batch.last = last
                yield batch
        finally:
            self.skip_log.flush()

    def skipped_image(self, item: Item, reason: str) -> None:
        """An image neither backend can decode: counted every time, logged aggregated."""
        self.stream.count(reason)
        self.skip_log.note(reason, item.sample.key)

    def consumed(self, batch: Batch) -> None:
        """Call once a batch has been trained on: the resume state then starts after it."""
        self.stream.mark_consumed(batch.last)

    # ---- torch backend -------------------------------------------------------------------------
    def _torch_batches(self) -> Iterator[tuple[Batch, Item]]:
        from .augment_torch import normalize

        cfg, B = self.cfg, self.cfg.batch_size
        items = iter(self.stream)
        pool = None
        if cfg.workers > 0:
            pool = augmentation_pool(cfg.workers)  # ignores Ctrl-C, dies with the trainer
        try:
            in_flight: deque = deque()
            ready: list[tuple[np.ndarray, np.ndarray, Item]] = []
            exhausted = False
            while True:
                while not exhausted and len(in_flight) < max(1, 2 * cfg.workers):
                    chunk = [it for _, it in zip(range(B), items)]
                    if not chunk:
                        exhausted = True
                        break
                    # Augmentation randomness depends on the data position, not on which worker runs it.
                    args = ([it.sample.data for it in chunk], cfg.recipe, cfg.image_size,
                            batch_seed(cfg.seed, cfg.rank, chunk[0]))
                    in_flight.append((chunk, pool.submit(augment_chunk, *args) if pool else augment_chunk(*args)))
                if not in_flight:
                    if ready:  # only with a finite --epochs: the tail that cannot fill a batch
                        self.stream.count("partial_last_batch", len(ready))
                    return
                chunk, result = in_flight.popleft()
                q, k, reasons = result.result() if pool else result
                row = 0
                for item, reason in zip(chunk, reasons):
                    if reason is not None:
                        self.skipped_image(item, reason)
                        continue
                    ready.append((q[row], k[row], item))
                    row += 1
                while len(ready) >= B:
                    rows, ready = ready[:B], ready[B:]
                    qb = normalize(np.stack([r[0] for r in rows]))
                    kb = normalize(np.stack([r[1] for r in rows]))
                    yield Batch(qb, kb, [r[2].sample.key for r in rows]), rows[-1][2]
        finally:
            if pool:
                pool.shutdown(wait=False, cancel_futures=True)

    # ---- DALI backend --------------------------------------------------------------------------
    def _checked(self, checks: ThreadPoolExecutor) -> Iterator[tuple[Item, str | None]]:
        """The stream with each item's pre-flight answer. DALI cannot skip a bad image itself: anything it could
        choke on is filtered by check_image. The checks run up to two batches ahead on their own threads (PIL
        and nvImageCodec decode without the GIL), so they overlap the training step instead of stalling it."""
        from . import image_check

        ahead: deque = deque()  # (item, future reason), in stream order
        for item in self.stream:
            ahead.append((item, checks.submit(image_check.check_image, item.sample.data)))
            if len(ahead) > 2 * self.cfg.batch_size:
                item, reason = ahead.popleft()
                yield item, reason.result()
        while ahead:
            item, reason = ahead.popleft()
            yield item, reason.result()

    def _dali_batches(self) -> Iterator[tuple[Batch, Item]]:
        from .augment_dali import build_two_view_pipeline, dali_outputs_to_torch

        cfg, B = self.cfg, self.cfg.batch_size
        checks = ThreadPoolExecutor(max(1, cfg.workers), thread_name_prefix="image-check") if self.preflight else None
        # Trusted shards go straight to DALI; anything that slips through fails one batch (counted below).
        items = self._checked(checks) if checks else ((item, None) for item in self.stream)
        pending: dict[int, Item] = {}  # sample id -> item, for batches inside the pipeline
        next_id = 0

        def source():
            nonlocal next_id
            encoded, first = [], None
            while len(encoded) < B:
                item, reason = next(items)  # StopIteration ends the pipeline's epoch (only with --epochs)
                if reason is not None:
                    self.skipped_image(item, reason)
                    continue
                first = first or item
                pending[next_id + len(encoded)] = item
                encoded.append(np.frombuffer(item.sample.data, dtype=np.uint8))
            ids = np.arange(next_id, next_id + B, dtype=np.int64).reshape(B, 1)
            next_id += B
            # augmentation keyed to the data position, as in the torch backend
            return encoded, ids, batch_seed(cfg.seed, cfg.rank, first)

        def build():
            pipe = build_two_view_pipeline(
                source, batch_size=B, size=cfg.image_size, recipe=cfg.recipe, device=cfg.device,
                num_threads=max(1, cfg.workers), seed=cfg.seed * 1000 + cfg.rank, device_id=cfg.device_id)
            pipe.build()
            return pipe

        try:
            pipe = build()
            while True:
                try:
                    outputs = pipe.run()
                except StopIteration:  # only with a finite --epochs
                    if pending:
                        self.stream.count("partial_last_batch", len(pending))
                    return
                except Exception as e:  # a decoder failure: lose only what was inside the pipeline
                    self.stream.count("decoder_error", len(pending))
                    log.error("DALI pipeline failed, %d in-flight samples skipped, rebuilding: %s", len(pending), e)
                    pending.clear()
                    del pipe
                    pipe = build()
                    continue
                q, k, ids = dali_outputs_to_torch(outputs, cfg.device)
                batch_items = [pending.pop(i) for i in ids.tolist()]
                yield Batch(q, k, [it.sample.key for it in batch_items]), batch_items[-1]
        finally:
            items.close()
            if checks:
                checks.shutdown(wait=False, cancel_futures=True)


def needs_preflight(mode: str, validated_by: dict | None) -> bool:
    """always / never as asked; auto: unless the shards' manifest carries the validation stamp written by
    `shards create` and it covers what the check would find."""
    from .image_check import trusted

    return mode == "always" if mode != "auto" else not trusted(validated_by)


def batch_seed(seed: int, rank: int, first: Item) -> int:
    """The augmentation seed of a batch: a function of where its data sits in the stream."""
    return hash((seed, rank, first.epoch, first.position)) & 0x7FFFFFFF


def augment_chunk(datas: list[bytes], recipe: str, size: int, seed: int):
    """Decode + two views for a chunk of images (runs in a worker process). Returns uint8 arrays
    for the decodable images and, per input, None or the reason it was skipped."""
    from .augment_torch import UndecodableImage, two_view_transform

    torch.set_num_threads(1)
    random.seed(seed)
    torch.manual_seed(seed)
    transform = two_view_transform(recipe, size)
    qs, ks, reasons = [], [], []
    for data in datas:
        try:
            q, k = transform.from_bytes(data)
        except UndecodableImage as e:
            reasons.append(e.reason)
            continue
        except Exception:  # anything else PIL raises on hostile input
            reasons.append("corrupt")
            continue
        qs.append(q.numpy())
        ks.append(k.numpy())
        reasons.append(None)
    empty = np.zeros((0, 3, size, size), np.uint8)
    return (np.stack(qs) if qs else empty), (np.stack(ks) if ks else empty), reasons
