"""An endless, resumable stream of samples for one rank, with bounded read-ahead of shards.

Resume state: (epoch, position in this rank's share of the epoch), plus what every rank shares: the seed,
a fingerprint of the shard list, and, for an epoch resumed with another number of ranks, the entries it
has left as merged intervals (plan.remaining). The plan is recomputed from it and the consumed part is
skipped without reading the shards it lives in. The state stays small however large the data and however
often the job is resized: `checkpoint_state` packs every rank's position with one copy of the shared part.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .interrupt import Interrupt, result
from .plan import Block, EpochPlan, lengths, remaining, slice_intervals
from .readers import Sample, read_samples
from .shard_table import ShardTable
from .sources import DataSpecError, Shard
from .storage import ShardReader, ShardReadError, Storage

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 1: per-rank level histories (an older plan: not resumable mid-epoch)


class ResumeMismatch(DataSpecError):
    """A checkpoint's stream was made over other data or with another seed: resuming would silently re-plan."""


@dataclass(frozen=True)
class Item:
    epoch: int
    position: int  # index of this sample in the rank's share of the epoch
    last: bool  # the last entry of that share
    sample: Sample


@dataclass(frozen=True)
class Layout:
    """How one epoch is read: its level-0 plan (`base_world` ranks over the first `shards` shards) and,
    after elastic resizes, the level-0 entries still to read, split equally over the current ranks."""

    base_world: int
    shards: int
    pool: np.ndarray | None = None  # (n, 2) merged intervals of level-0 entries; None: all of level 0
    drop: int = 0  # entries dropped earlier and not yet counted: counted with this level's remainder

    def raw(self, epoch: int) -> dict:
        pool = None if self.pool is None else self.pool.reshape(-1).tolist()
        return {"epoch": epoch, "base_world": self.base_world, "shards": self.shards, "drop": self.drop, "pool": pool}

    @staticmethod
    def of(raw: dict) -> "Layout":
        pool = None if raw["pool"] is None else np.asarray(raw["pool"], np.int64).reshape(-1, 2)
        return Layout(int(raw["base_world"]), int(raw["shards"]), pool, int(raw["drop"]))


@dataclass
class _Group:
    """Consecutive reads from one block of one epoch: the unit of read-ahead."""

    epoch: int
    block: Block | None
    rank0: int
    index: int  # the block's index among its level-0 rank's blocks
    total: int  # length of the rank's share of the epoch
    fresh: bool  # the epoch is read from its start (not resumed, not re-split)
    runs: list[tuple[int, int, int]]  # (position of the run's first entry, block read positions start, stop)
    drop: int = 0  # counted as epoch_remainder when this group is delivered


class SampleStream:
    def __init__(self, shards: list[Shard] | ShardTable, *, seed: int, world: int, rank: int,
                 shuffle_shards: int = 4, read_ahead: int = 2, read_ahead_bytes: int = 1 << 30,
                 epochs: int | None = None, reader: ShardReader | None = None):
        self.shards = shards if isinstance(shards, ShardTable) else ShardTable.from_shards(shards)
        self.counts = self.shards.counts
        self.seed, self.world, self.rank = seed, world, rank
        self.shuffle_shards, self.epochs = max(1, shuffle_shards), epochs
        self.read_ahead, self.read_ahead_bytes = max(1, read_ahead), read_ahead_bytes
        self.reader = reader or ShardReader(Storage())  # default: the default storage settings
        self._totals: dict[int, int] = {}
        if self._total(len(self.shards)) // world == 0:
            raise DataSpecError(f"the data has {self._total(len(self.shards))} samples: fewer than the {world} ranks")
        # Resume state: where the next sample comes from, and how epochs other than plain ones are read.
        self.epoch, self.position = 0, 0
        self.layouts: dict[int, Layout] = {}
        self.skipped: Counter = Counter()  # reason -> samples lost
        self._lock = threading.Lock()
        self._plans: dict[tuple, Future] = {}
        self._planner = ThreadPoolExecutor(1, thread_name_prefix="plan")
        self._share_lengths: dict[int, int] = {}
        self.interrupted: Interrupt = None  # the consumer's stop request: cuts a wait for a read short

    # ---- layouts and plans -----------------------------------------------------------------------
    def _total(self, shards: int) -> int:
        if shards not in self._totals:
            self._totals[shards] = int(self.counts[:shards].sum())
        return self._totals[shards]

    def layout(self, epoch: int) -> Layout:
        if epoch in self.layouts:
            return self.layouts[epoch]
        return self._fresh(self.world, len(self.shards))

    def _fresh(self, world: int, shards: int) -> Layout:
        return Layout(world, shards, None, self._total(shards) % world)

    def _pool(self, lay: Layout) -> np.ndarray:
        if lay.pool is not None:
            return lay.pool
        return np.array([[0, self._total(lay.shards) // lay.base_world * lay.base_world]], np.int64)

    def _plan(self, epoch: int, lay: Layout) -> EpochPlan:
        for old in [k for k in self._plans if k[0] < epoch - 1]:
            del self._plans[old]
        return self._submit_plan(epoch, lay).result()

    def _submit_plan(self, epoch: int, lay: Layout) -> Future:
        """The plan of `epoch`, built on the planning thread: asked for an epoch ahead, no step waits for it."""
        key = (epoch, lay.shards, lay.base_world)
        if key not in self._plans:
            self._plans[key] = self._planner.submit(
                EpochPlan, self.counts[: lay.shards], self.seed, epoch, self.shuffle_shards, lay.base_world)
        return self._plans[key]

    def _share(self, lay: Layout) -> tuple[np.ndarray, int]:
        """This rank's intervals of the epoch and the level's remainder (dropped to keep ranks equal)."""
        pool = self._pool(lay)
        size = int(lengths(pool).sum())
        per = size // self.world
        return slice_intervals(pool, self.rank * per, (self.rank + 1) * per), size % self.world + lay.drop

    def share_length(self, epoch: int) -> int:
        if epoch not in self._share_lengths:
            self._share_lengths = {epoch: int(lengths(self._pool(self.layout(epoch))).sum()) // self.world}
        return self._share_lengths[epoch]

    def progress(self) -> float:
        """Share of this rank's epoch consumed: O(1) (the share's length is computed once per epoch)."""
        share = self.share_length(self.epoch)
        return self.position / share if share else 1.0

    # ---- state ---------------------------------------------------------------------------------
    def fingerprint(self, shards: int | None = None) -> str:
        return self.shards.fingerprint(shards)

    def position_state(self) -> list[int]:
        """What differs between ranks: gathered from every rank for a checkpoint."""
        return [self.epoch, self.position]

    @property
    def selection(self) -> str | None:
        """The fingerprint of the curated selection read (None: all samples of the shards)."""
        return None if self.shards.kept is None else self.shards.kept.fingerprint

    def shared_state(self) -> dict:
        return {"version": STATE_VERSION, "seed": self.seed, "shuffle_shards": self.shuffle_shards,
                "world": self.world, "shards": len(self.shards), "fingerprint": self.fingerprint(),
                "selection": self.selection, "layouts": [lay.raw(e) for e, lay in sorted(self.layouts.items())]}

    def checkpoint_state(self, positions: list[list[int]]) -> dict:
        """Every rank's stream state in one small dict: the shared part once, then each rank's position."""
        return {**self.shared_state(), "ranks": [[int(e), int(p)] for e, p in positions]}

    def state_dict(self) -> dict:
        """This rank's own state, self-contained."""
        return {**self.shared_state(), "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """This rank's own saved state (same number of ranks)."""
        self.load_states({**state, "ranks": [[state["epoch"], state["position"]]] * self.world})

    def load_states(self, state) -> None:
        """Resume from a checkpoint_state (or a list of every rank's state_dict): exactly this rank's stream
        when the number of ranks is unchanged, otherwise an equal share of what each epoch in progress has
        left (elastic). Refused (ResumeMismatch) when the seed or the shard list changed, unless shards were
        only appended: the epochs in progress then finish on the old list, the new shards join after."""
        packed = _packed(state)
        if packed is None:  # an older stream's checkpoint: its epoch starts again
            self.epoch, self.position, self.layouts = min(int(s["epoch"]) for s in state), 0, {}
            return
        state = packed
        old_n = self._check(state)
        old_world, ranks = int(state["world"]), [(int(e), int(p)) for e, p in state["ranks"]]
        layouts = {int(r["epoch"]): Layout.of(r) for r in state["layouts"]}
        epochs = sorted({e for e, _ in ranks})
        if old_n < len(self.shards):
            for e in epochs:
                layouts.setdefault(e, self._fresh(old_world, old_n))
            log.info("rank %d: the shard list grew from %d to %d shards: epoch %s finishes on the old list, the "
                     "new shards join from epoch %d", self.rank, old_n, len(self.shards),
                     " and ".join(map(str, epochs)), epochs[-1] + 1)
        self._share_lengths = {}
        if old_world == self.world:
            self.layouts = layouts
            self.epoch, self.position = ranks[self.rank]
            return
        self.layouts = self._resplit(layouts, ranks, old_world, old_n)
        self.epoch, self.position = epochs[0], 0
        log.info("rank %d: elastic resume from %d to %d ranks in epoch %d", self.rank, old_world, self.world, epochs[0])

    def _resplit(self, layouts: dict[int, Layout], ranks: list[tuple[int, int]], old_world: int,
                 old_n: int) -> dict[int, Layout]:
        """The layouts of the epochs in progress re-split over this world: what each still has left.
        A rank already in the next epoch finished the first; ranks cannot be more than an epoch apart."""
        first = min(e for e, _ in ranks)
        out = {}
        for epoch in (first, first + 1):
            if epoch > first and all(e == first for e, _ in ranks):
                break
            lay = layouts.get(epoch) or self._fresh(old_world, old_n)
            pool = self._pool(lay)
            share = int(lengths(pool).sum()) // old_world
            positions = [p if e == epoch else (share if e > epoch else 0) for e, p in ranks]
            # The old level's remainder was counted when its rank 0 started it; if it had not, count it now.
            started = ranks[0][0] > epoch or (ranks[0][0] == epoch and ranks[0][1] > 0)
            drop = 0 if started else lay.drop + int(lengths(pool).sum()) % old_world
            out[epoch] = Layout(lay.base_world, lay.shards, remaining(pool, old_world, positions), drop)
        return out

    def _check(self, state: dict) -> int:
        """The number of shards the checkpoint's list had, after checking it is this list or its start."""
        for name, flag in (("seed", "--seed"), ("shuffle_shards", "--shuffle-shards")):
            if int(state[name]) != getattr(self, name):
                raise ResumeMismatch(f"--resume: the checkpoint's data order was made with {flag} {state[name]}, "
                                     f"this run has {flag} {getattr(self, name)}; resume with {flag} {state[name]} "
                                     "or start a new --checkpoint-dir")
        if state.get("selection") != self.selection:
            what = ("all samples of its data" if state.get("selection") is None else
                    "another curated selection" if self.selection is not None else "a curated selection")
            raise ResumeMismatch(f"--resume: the checkpoint was trained on {what}, this --data is "
                                 f"{'a curated selection' if self.selection else 'not curated'} "
                                 f"(selection {self.selection or 'none'}); resume with the checkpoint's --data "
                                 "or start a new --checkpoint-dir")
        old_n, new_n = int(state["shards"]), len(self.shards)
        if old_n > new_n or self.fingerprint(old_n) != state["fingerprint"]:
            what = (f"it had {old_n} shards, this --data has {new_n}" if old_n > new_n else
                    f"the first {old_n} shards differ in names, sample counts or sha256" if old_n < new_n else
                    f"the same number of shards ({old_n}) but other names, sample counts or sha256")
            raise ResumeMismatch(f"--resume: the shard list is not the checkpoint's ({what}); only appending shards "
                                 "is allowed: resume with the checkpoint's --data or start a new --checkpoint-dir")
        return old_n

    def mark_consumed(self, item: Item) -> None:
        """Record that everything up to and including `item` was used."""
        self.epoch, self.position = item.epoch, item.position + 1
        if item.last:
            self.epoch, self.position = item.epoch + 1, 0
        for old in [e for e in self.layouts if e < self.epoch - 1]:  # the previous epoch's is kept for rank 0's checkpoint
            del self.layouts[old]

    def count(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.skipped[reason] += n

    # ---- reading -------------------------------------------------------------------------------
    def _load_shard(self, index: int) -> list[Sample]:
        shard = self.shards[index]
        try:
            samples = list(read_samples(shard, self.reader.read(shard)))
            if self.shards.kept is None:
                return samples
            return self.shards.kept.select(index, samples, self.reader.storage)  # a curated selection's samples
        except OSError as e:  # ShardReadError, or a selection's members unreadable
            log.error("shard unreadable, its samples skipped: %s (%s)", shard.url, e)
            return []

    def _groups(self) -> Iterator[_Group]:
        """The rank's reads from the saved state on, epoch after epoch, one group per block."""
        epoch, skip = self.epoch, self.position
        while self.epochs is None or epoch < self.epochs:
            lay = self.layout(epoch)
            plan = self._plan(epoch, lay)
            if self.epochs is None or epoch + 1 < self.epochs:
                self._submit_plan(epoch + 1, self.layout(epoch + 1))
            share, remainder = self._share(lay)
            total = int(lengths(share).sum())
            fresh = skip == 0 and lay.pool is None
            drop = remainder if self.rank == 0 and skip == 0 else 0  # dropped so that every rank gets the same count
            group, position = None, skip
            for seg in plan.segments(slice_intervals(share, skip, total)):  # the consumed part is never read
                if group is not None and (group.rank0, group.index) == (seg.rank0, seg.block):
                    group.runs.append((position, seg.start, seg.stop))
                else:
                    if group is not None:
                        yield group
                    group = _Group(epoch, seg.ref, seg.rank0, seg.block, total, fresh, [(position, seg.start, seg.stop)], drop)
                    drop = 0
                position += seg.stop - seg.start
            # an empty share still ends its epoch (and counts its remainder)
            yield group if group is not None else _Group(epoch, None, -1, -1, total, fresh, [], drop)
            epoch, skip = epoch + 1, 0

    def _block_bytes(self, block: Block | None) -> int:
        return sum(max(0, int(self.shards.sizes[p.shard])) for p in block.pieces) if block else 0

    def __iter__(self) -> Iterator[Item]:
        """Items from the saved state on, epoch after epoch. Shards are read ahead across epoch ends
        (up to `read_ahead` blocks and `read_ahead_bytes` in flight), one thread per shard in flight. Closing
        the iterator does not wait for the reads in flight (a stalled one may take minutes to give up)."""
        groups = self._groups()
        window: deque[tuple[_Group, dict[int, Future], int]] = deque()
        in_flight, exhausted = 0, False
        delivered: Counter = Counter()
        pool = ThreadPoolExecutor(max_workers=self.read_ahead * self.shuffle_shards, thread_name_prefix="shard-read")
        try:
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
                    size = self._block_bytes(g.block)
                    if window and in_flight + size > self.read_ahead_bytes:
                        return  # bounded bytes in flight (one block always goes)
                    peeked.pop()
                    futures = {p.shard: pool.submit(self._load_shard, p.shard) for p in g.block.pieces} if g.block else {}
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
                loaded = {shard: result(f, self.interrupted) for shard, f in futures.items()}
                in_flight -= size
                fill()
                if g.drop:  # counted when delivered, not when read ahead
                    self.count("epoch_remainder", g.drop)
                delivered[("fresh", g.epoch)] += g.fresh
                yield from self._items(g, loaded, delivered)
            if previous_epoch is not None:
                self._epoch_done(previous_epoch, delivered)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _items(self, g: _Group, loaded: dict[int, list[Sample]], delivered: Counter) -> Iterator[Item]:
        for position, start, stop in g.runs:
            shards, indices = g.block.locate(start, stop)
            for pos, shard, index in zip(range(position, position + stop - start), shards.tolist(), indices.tolist()):
                samples = loaded[shard]
                if index < len(samples) and samples[index].error:
                    self.count(samples[index].error)
                elif index < len(samples):
                    delivered[g.epoch] += 1
                    yield Item(g.epoch, pos, pos == g.total - 1, samples[index])
                elif samples:  # the shard ended early (a truncated tar)
                    self.count("missing_in_shard")
                else:
                    self.count("shard_unreadable")

    def _epoch_done(self, epoch: int, delivered: Counter) -> None:
        if delivered[epoch] == 0 and delivered[("fresh", epoch)]:
            raise DataSpecError(f"epoch {epoch} produced no readable sample on rank {self.rank}")
        log.info("rank %d: epoch %d done", self.rank, epoch)


def _packed(state) -> dict | None:
    """A checkpoint_state from what a checkpoint holds: that dict, or a list of every rank's state_dict.
    A checkpoint of an older stream (another plan) cannot be resumed mid-epoch: None, with a warning."""
    if isinstance(state, list):
        if not state or state[0].get("version") != STATE_VERSION:
            log.warning("the checkpoint's stream state is from an older version: the data order starts afresh")
            return None
        return {**state[0], "ranks": [[s["epoch"], s["position"]] for s in state]}
    return state
