"""An endless, resumable stream of samples for one rank, with bounded read-ahead of shards.

Resume state: (epoch, position in this rank's share of the epoch, the epoch's elastic history). The
plan is recomputed from it and the consumed part is skipped without reading the shards it lives in.
Resuming with another number of ranks re-splits what is left of the epoch (see plan.EpochPlan).
"""
from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

from .plan import EpochPlan, Level, Segment, dropped_per_epoch, samples_per_rank
from .readers import Sample, read_samples
from .sources import DataSpecError, Shard
from .storage import ShardReader, ShardReadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    epoch: int
    position: int  # index of this sample in the rank's share of the epoch
    last: bool  # the last entry of that share
    sample: Sample


@dataclass
class _Group:
    """Consecutive reads from one block of one epoch: the unit of read-ahead."""

    epoch: int
    plan: EpochPlan
    rank0: int
    block: int
    total: int  # length of the rank's share of the epoch
    fresh: bool  # the epoch is read from its start (not resumed, not re-split)
    runs: list[tuple[int, Segment]]  # (position of the run's first entry, the block segment)


def _levels(raw) -> list[Level]:
    return [Level(int(x["world"]), tuple(int(p) for p in x["positions"])) for x in raw]


def _raw(levels: list[Level]) -> list[dict]:
    return [{"world": lv.world, "positions": list(lv.positions)} for lv in levels]


class SampleStream:
    def __init__(self, shards: list[Shard], *, seed: int, world: int, rank: int, shuffle_shards: int = 4,
                 read_ahead: int = 2, read_ahead_bytes: int = 1 << 30, epochs: int | None = None,
                 reader: ShardReader | None = None):
        if any(s.samples is None for s in shards):
            raise ValueError("shard sample counts must be known (see sources.with_counts)")
        self.shards, self.counts = shards, [s.samples for s in shards]
        self.seed, self.world, self.rank = seed, world, rank
        self.shuffle_shards, self.epochs = max(1, shuffle_shards), epochs
        self.read_ahead, self.read_ahead_bytes = max(1, read_ahead), read_ahead_bytes
        self.reader = reader or ShardReader()
        if samples_per_rank(self.counts, world) == 0:
            raise DataSpecError(f"the data has {sum(self.counts)} samples: fewer than the {world} ranks")
        # Resume state: where the next sample comes from.
        self.epoch, self.position = 0, 0
        self.history: list[Level] = []  # elastic levels of `epoch` before the current one
        self.next_history: list[Level] = []  # ... and of epoch + 1, when a resize caught ranks in both
        self.skipped: Counter = Counter()  # reason -> samples lost
        self._lock = threading.Lock()

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "world": self.world, "seed": self.seed,
                "history": _raw(self.history), "next_history": _raw(self.next_history)}

    def load_state_dict(self, state: dict) -> None:
        """This rank's own saved state (same number of ranks)."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.history = _levels(state.get("history", []))
        self.next_history = _levels(state.get("next_history", []))

    def load_states(self, states: list[dict]) -> None:
        """Resume from every rank's saved state: exactly this rank's stream when the number of ranks is
        unchanged, otherwise an equal share of what each epoch in progress has left (elastic)."""
        if len(states) == self.world:
            self.load_state_dict(states[self.rank])
            return
        old_world = len(states)
        epoch = min(int(s["epoch"]) for s in states)
        behind = next(s for s in states if int(s["epoch"]) == epoch)
        history = _levels(behind.get("history", []))
        plan = self._plan(epoch, history, old_world)
        done = plan.share_length(history, old_world)  # a rank already in the next epoch finished this one
        positions = tuple(int(s["position"]) if int(s["epoch"]) == epoch else done for s in states)
        self.epoch, self.position = epoch, 0
        self.history = history + [Level(old_world, positions)]
        ahead = [int(s["position"]) if int(s["epoch"]) == epoch + 1 else 0 for s in states]
        self.next_history = [Level(old_world, tuple(ahead))] if any(ahead) else []
        log.info("rank %d: elastic resume from %d to %d ranks in epoch %d", self.rank, old_world, self.world, epoch)

    def mark_consumed(self, item: Item) -> None:
        """Record that everything up to and including `item` was used."""
        if item.epoch != self.epoch:  # the batch crossed into the next epoch
            self.epoch, self.history, self.next_history = item.epoch, self.next_history, []
        self.position = item.position + 1
        if item.last:
            self.epoch, self.position, self.history, self.next_history = item.epoch + 1, 0, self.next_history, []

    def count(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.skipped[reason] += n

    def progress(self) -> float:
        share = self._plan(self.epoch, self.history, self.world).share_length(self.history, self.world)
        return self.position / share if share else 1.0

    # ---- reading -------------------------------------------------------------------------------
    def _plan(self, epoch: int, history: list[Level], world: int) -> EpochPlan:
        base = history[0].world if history else world
        return EpochPlan(self.counts, self.seed, epoch, self.shuffle_shards, base)

    def _load_shard(self, index: int) -> list[Sample]:
        shard = self.shards[index]
        try:
            return list(read_samples(shard, self.reader.read(shard)))
        except ShardReadError as e:
            log.error("shard unreadable, its samples skipped: %s (%s)", shard.url, e)
            return []

    def _block_bytes(self, plan: EpochPlan, seg: Segment) -> int:
        block = plan.blocks(seg.rank0)[0][seg.block]
        return sum(self.shards[p.shard].bytes or 0 for p in block.pieces)

    def _groups(self) -> Iterator[_Group]:
        """The rank's reads from the saved state on, epoch after epoch, one group per block."""
        epoch, skip, history, next_history = self.epoch, self.position, self.history, self.next_history
        while self.epochs is None or epoch < self.epochs:
            plan = self._plan(epoch, history, self.world)
            share = plan.share(history, self.world, self.rank)
            total = sum(b - a for a, b in share)
            fresh = skip == 0 and not history
            if self.rank == 0 and skip == 0:  # dropped so that every rank gets the same count
                drop = plan.remainder(history, self.world) + (dropped_per_epoch(self.counts, plan.base_world) if not history else 0)
                if drop:
                    self.count("epoch_remainder", drop)
            group, position = None, 0
            for seg in plan.segments(share):  # resume: segments already consumed are never read
                n = seg.stop - seg.start
                if position + n > skip:
                    cut = max(0, skip - position)
                    run = (position + cut, Segment(seg.rank0, seg.block, seg.start + cut, seg.stop))
                    if group is not None and (group.rank0, group.block) == (seg.rank0, seg.block):
                        group.runs.append(run)
                    else:
                        if group is not None:
                            yield group
                        group = _Group(epoch, plan, seg.rank0, seg.block, total, fresh, [run])
                position += n
            if group is not None:
                yield group
            elif fresh:
                yield _Group(epoch, plan, -1, -1, total, fresh, [])  # an empty epoch still ends
            epoch, skip, history, next_history = epoch + 1, 0, next_history, []

    def __iter__(self) -> Iterator[Item]:
        """Items from the saved state on, epoch after epoch. Shards are read ahead across epoch ends
        (up to `read_ahead` blocks and `read_ahead_bytes` in flight), one thread per shard in flight."""
        groups = self._groups()
        window: deque[tuple[_Group, dict[int, Future], int]] = deque()
        in_flight, exhausted = 0, False
        delivered: Counter = Counter()
        with ThreadPoolExecutor(max_workers=self.read_ahead * self.shuffle_shards,
                                thread_name_prefix="shard-read") as pool:
            peeked: list[_Group] = []

            def fill():
                nonlocal in_flight, exhausted
                while not exhausted and len(window) < self.read_ahead:
                    if not peeked:
                        nxt = next(groups, None)
                        if nxt is None:
                            exhausted = True
                            return
                        peeked.append(nxt)
                    g = peeked[0]
                    block = g.plan.blocks(g.rank0)[0][g.block] if g.runs else None
                    size = sum(self.shards[p.shard].bytes or 0 for p in block.pieces) if block else 0
                    if window and in_flight + size > self.read_ahead_bytes:
                        return  # bounded bytes in flight (one block always goes)
                    peeked.pop()
                    futures = {p.shard: pool.submit(self._load_shard, p.shard) for p in block.pieces} if block else {}
                    window.append((g, futures, size))
                    in_flight += size

            previous_epoch = None
            while True:
                fill()
                if not window:
                    break
                g, futures, size = window.popleft()
                if previous_epoch is not None and g.epoch != previous_epoch:
                    self._epoch_done(previous_epoch, delivered)
                previous_epoch = g.epoch
                loaded = {shard: f.result() for shard, f in futures.items()}
                in_flight -= size
                fill()
                block = g.plan.blocks(g.rank0)[0][g.block] if g.runs else None
                delivered[("fresh", g.epoch)] += g.fresh
                for position, seg in g.runs:
                    for j in range(seg.start, seg.stop):
                        shard, index = block.sample_at(j)
                        samples = loaded[shard]
                        pos = position + (j - seg.start)
                        if index < len(samples) and samples[index].error:
                            self.count(samples[index].error)
                        elif index < len(samples):
                            delivered[g.epoch] += 1
                            yield Item(g.epoch, pos, pos == g.total - 1, samples[index])
                        elif samples:  # the shard ended early (a truncated tar)
                            self.count("missing_in_shard")
                        else:
                            self.count("shard_unreadable")
            if previous_epoch is not None:
                self._epoch_done(previous_epoch, delivered)

    def _epoch_done(self, epoch: int, delivered: Counter) -> None:
        if delivered[epoch] == 0 and delivered[("fresh", epoch)]:
            raise DataSpecError(f"epoch {epoch} produced no readable sample on rank {self.rank}")
        log.info("rank %d: epoch %d done", self.rank, epoch)
