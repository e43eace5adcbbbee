"""An endless, resumable stream of (position, sample) for one rank, with read-ahead of shards.

Position counts the samples of the rank's epoch plan already handed out; together with the epoch it
is the whole resume state: the plan is recomputed and the first `position` entries are skipped without
reading the shards they live in.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

from .plan import Block, dropped_per_epoch, rank_blocks, samples_per_rank
from .readers import Sample, read_samples
from .sources import DataSpecError, Shard, read_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    epoch: int
    position: int  # index of this sample in the rank's epoch plan
    sample: Sample


class SampleStream:
    def __init__(self, shards: list[Shard], *, seed: int, world: int, rank: int, shuffle_shards: int = 4,
                 read_ahead: int = 2, epochs: int | None = None):
        if any(s.samples is None for s in shards):
            raise ValueError("shard sample counts must be known (see sources.with_counts)")
        self.shards, self.counts = shards, [s.samples for s in shards]
        self.seed, self.world, self.rank = seed, world, rank
        self.shuffle_shards, self.read_ahead, self.epochs = max(1, shuffle_shards), max(1, read_ahead), epochs
        if samples_per_rank(self.counts, world) == 0:
            raise DataSpecError(f"the data has {sum(self.counts)} samples: fewer than the {world} ranks")
        self.epoch, self.position = 0, 0  # where the next iteration starts
        self.skipped: Counter = Counter()  # reason -> samples lost
        self._lock = threading.Lock()

    @property
    def samples_per_epoch(self) -> int:
        """Planned samples per epoch for this rank (identical on every rank)."""
        return samples_per_rank(self.counts, self.world)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def count(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.skipped[reason] += n

    def _load_shard(self, index: int) -> list[Sample]:
        shard = self.shards[index]
        try:
            data = read_bytes(shard.url)
        except Exception as e:
            log.error("shard unreadable, skipped: %s (%s)", shard.url, e)
            return []
        return list(read_samples(shard, data))

    def _fetch(self, pool: ThreadPoolExecutor, block: Block) -> dict[int, Future]:
        return {p.shard: pool.submit(self._load_shard, p.shard) for p in block.pieces}

    def _epoch_items(self, epoch: int, skip: int) -> Iterator[Item]:
        blocks = list(rank_blocks(self.counts, self.seed, epoch, self.world, self.rank, self.shuffle_shards))
        position = 0
        while blocks and skip >= blocks[0].size:  # resume: whole blocks already consumed are never read
            skip -= blocks[0].size
            position += blocks.pop(0).size
        if self.rank == 0 and dropped_per_epoch(self.counts, self.world):
            self.count("epoch_remainder", dropped_per_epoch(self.counts, self.world))
        with ThreadPoolExecutor(max_workers=self.read_ahead, thread_name_prefix="shard-read") as pool:
            pending = [self._fetch(pool, b) for b in blocks[: self.read_ahead]]
            for i, block in enumerate(blocks):
                loaded = {s: f.result() for s, f in pending.pop(0).items()}
                if i + self.read_ahead < len(blocks):
                    pending.append(self._fetch(pool, blocks[i + self.read_ahead]))
                for j in range(skip, block.size):
                    shard, index = block.sample_at(j)
                    samples = loaded[shard]
                    if index < len(samples) and samples[index].error:
                        self.count(samples[index].error)
                    elif index < len(samples):
                        yield Item(epoch, position + j, samples[index])
                    elif samples:  # the shard ended early (a truncated tar)
                        self.count("missing_in_shard")
                    else:
                        self.count("shard_unreadable")
                position += block.size
                skip = 0

    def __iter__(self) -> Iterator[Item]:
        """Items from the saved (epoch, position) on, epoch after epoch."""
        epoch, skip = self.epoch, self.position
        while self.epochs is None or epoch < self.epochs:
            delivered = 0
            for item in self._epoch_items(epoch, skip):
                delivered += 1
                yield item
            if delivered == 0 and skip == 0:
                raise DataSpecError(f"epoch {epoch} produced no readable sample on rank {self.rank}")
            epoch, skip = epoch + 1, 0
            log.info("rank %d: epoch %d done", self.rank, epoch - 1)

    def mark_consumed(self, epoch: int, position: int) -> None:
        """Record that everything up to and including `position` of `epoch` was used."""
        self.epoch, self.position = epoch, position + 1
        if self.position >= self.samples_per_epoch:
            self.epoch, self.position = epoch + 1, 0
