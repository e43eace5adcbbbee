"""Which samples each rank reads in an epoch, and in what order: a pure function of
(shard sizes, seed, epoch, world size, rank), so every restart can recompute it.

1. The shard list is shuffled with the epoch's seed (one array permutation).
2. The epoch's samples, laid end to end in that order, are cut into `world` equal contiguous spans
   (the last `total % world` samples of the epoch are dropped and counted, so every rank gets
   exactly the same number of samples: no rank can run dry and hang the others at a collective).
3. Each rank reads its span in blocks of `shuffle_shards` consecutive shard pieces and shuffles the
   samples within a block: a bounded in-memory shuffle that mixes several shards at a time.

Costs grow with shards, never with samples: the plan is the shuffled shard order and its cumulative sample
counts (two arrays); a block's pieces are found by binary search, and its read order (a seeded permutation)
is drawn only when the block is read. Nothing builds a rank's whole share.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class Piece:
    shard: int  # index into the shard list
    start: int  # first sample index within the shard
    stop: int


def _rng(*parts) -> np.random.Generator:
    """A generator seeded from the parts' text: the same on every process and platform."""
    digest = hashlib.blake2b("-".join(str(p) for p in parts).encode(), digest_size=16).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))


@dataclass
class Block:
    """A few consecutive shard pieces of one rank's level-0 share, read in a shuffled order."""

    pieces: tuple[Piece, ...]
    seed: tuple  # what the read order is drawn from
    _order: np.ndarray | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return sum(p.stop - p.start for p in self.pieces)

    @property
    def order(self) -> np.ndarray:
        """A permutation of range(size): drawn on first use, when the block is read."""
        if self._order is None:
            self._order = _rng(*self.seed).permutation(self.size)
        return self._order

    def locate(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard indices, sample indices within their shards) of read positions start..stop."""
        lengths = np.array([p.stop - p.start for p in self.pieces], dtype=np.int64)
        ends = np.cumsum(lengths)
        j = self.order[start:stop]
        k = np.searchsorted(ends, j, side="right")
        shards = np.array([p.shard for p in self.pieces], dtype=np.int64)[k]
        firsts = np.array([p.start for p in self.pieces], dtype=np.int64)
        return shards, firsts[k] + j - (ends - lengths)[k]

    def sample_at(self, i: int) -> tuple[int, int]:
        """(shard index, sample index within shard) of the i-th sample read from this block."""
        if not 0 <= i < self.size:
            raise IndexError(i)
        shards, index = self.locate(i, i + 1)
        return int(shards[0]), int(index[0])


def samples_per_rank(counts, world: int) -> int:
    return int(np.sum(counts, dtype=np.int64)) // world


class EpochPlan:
    """One epoch's level-0 plan over `counts` with `base_world` ranks: O(shards) arrays, built in milliseconds."""

    def __init__(self, counts, seed: int, epoch: int, shuffle_shards: int, base_world: int):
        counts = np.asarray(counts, dtype=np.int64)
        self.seed, self.epoch, self.shuffle_shards, self.base_world = seed, epoch, shuffle_shards, base_world
        dtype = np.int32 if len(counts) < 2**31 else np.int64
        self.order = _rng(seed, epoch, "shards").permutation(len(counts)).astype(dtype, copy=False)
        self.ends = np.cumsum(counts[self.order])  # level-0 offset after each shuffled shard
        self.total = int(self.ends[-1]) if len(self.ends) else 0
        self.per0 = self.total // base_world
        self._spans: dict[int, tuple[int, int, int, int]] = {}

    def _position(self, offset: int) -> int:
        """Index in the shuffled order of the shard holding epoch sample `offset`."""
        return int(np.searchsorted(self.ends, offset, side="right"))

    def _span(self, rank0: int) -> tuple[int, int, int, int]:
        """(first, last shuffled position, lo, hi sample offsets) of a level-0 rank's share."""
        if rank0 not in self._spans:
            lo, hi = rank0 * self.per0, (rank0 + 1) * self.per0
            self._spans[rank0] = self._position(lo), self._position(hi - 1), lo, hi
        return self._spans[rank0]

    def pieces(self, rank0: int) -> list[Piece]:
        first, last, lo, hi = self._span(rank0)
        return self._pieces(first, last, lo, hi) if self.per0 else []

    def _pieces(self, first: int, last: int, lo: int, hi: int) -> list[Piece]:
        out = []
        for p in range(first, last + 1):
            begin, end = (int(self.ends[p - 1]) if p else 0), int(self.ends[p])
            a, b = max(lo, begin), min(hi, end)
            if a < b:
                out.append(Piece(int(self.order[p]), a - begin, b - begin))
        return out

    def block_count(self, rank0: int) -> int:
        first, last, _, _ = self._span(rank0)
        return -(-(last - first + 1) // self.shuffle_shards) if self.per0 else 0

    def block(self, rank0: int, k: int) -> tuple[Block, int]:
        """Block k of a level-0 rank's share and the share offset of its first sample."""
        first, last, lo, hi = self._span(rank0)
        a = first + k * self.shuffle_shards
        pieces = self._pieces(a, min(last, a + self.shuffle_shards - 1), lo, hi)
        start = max(lo, int(self.ends[a - 1]) if a else 0) - lo
        return Block(tuple(pieces), (self.seed, self.epoch, rank0, self.base_world, k, "samples")), start

    def block_at(self, entry: int) -> tuple[int, int]:
        """(level-0 rank, block index) holding level-0 entry `entry`."""
        rank0, j = divmod(entry, self.per0)
        first, _, lo, _ = self._span(rank0)
        return rank0, (self._position(lo + j) - first) // self.shuffle_shards

    def segments(self, intervals: np.ndarray) -> Iterator["Segment"]:
        """The intervals (level-0 entries) as runs within single blocks, in read order; lazily."""
        for a, b in intervals.tolist():
            while a < b:
                rank0, k = self.block_at(a)
                block, start = self.block(rank0, k)
                j = a - rank0 * self.per0
                take = min(b - a, start + block.size - j)
                yield Segment(rank0, k, j - start, j - start + take, block)
                a += take


def rank_pieces(counts, seed: int, epoch: int, world: int, rank: int) -> list[Piece]:
    return EpochPlan(counts, seed, epoch, 1, world).pieces(rank)


def rank_blocks(counts, seed: int, epoch: int, world: int, rank: int, shuffle_shards: int) -> Iterator[Block]:
    plan = EpochPlan(counts, seed, epoch, shuffle_shards, world)
    for k in range(plan.block_count(rank)):
        yield plan.block(rank, k)[0]


# ---- Elastic resume ------------------------------------------------------------------------------
# An epoch in progress may be resumed with another number of ranks. The samples not yet consumed are
# then re-split equally over the new ranks. What is left is kept as merged intervals over the epoch's
# level-0 sequence (the level-0 ranks' shares laid end to end): however many resizes, the state is the
# intervals left (at most one more per rank and resize, fewer once merged), never a history to replay.

@dataclass(frozen=True)
class Segment:
    rank0: int  # the level-0 rank whose block this is
    block: int  # index of the block in that rank's level-0 blocks
    start: int  # read positions start..stop of the block's order
    stop: int
    ref: Block | None = field(default=None, compare=False, repr=False)


def lengths(intervals: np.ndarray) -> np.ndarray:
    return intervals[:, 1] - intervals[:, 0]


def slice_intervals(intervals: np.ndarray, lo: int, hi: int, ends: np.ndarray | None = None) -> np.ndarray:
    """Entries lo..hi of the concatenation of `intervals` (an (n, 2) array; `ends`: its cumulative lengths)."""
    if hi <= lo or not len(intervals):
        return np.zeros((0, 2), np.int64)
    ends = np.cumsum(lengths(intervals)) if ends is None else ends
    i, j = np.searchsorted(ends, lo, side="right"), np.searchsorted(ends, hi - 1, side="right")
    out = intervals[i : j + 1].copy()
    starts = ends[i : j + 1] - lengths(out)
    out[0, 0] += lo - starts[0]
    out[-1, 1] -= ends[j] - hi
    return out


def merge(intervals: np.ndarray) -> np.ndarray:
    """Join intervals that touch (b == next a) and drop empty ones."""
    intervals = intervals[lengths(intervals) > 0]
    if len(intervals) < 2:
        return intervals
    breaks = np.flatnonzero(intervals[1:, 0] != intervals[:-1, 1]) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(intervals)]]) - 1
    return np.stack([intervals[starts, 0], intervals[stops, 1]], axis=1)


def remaining(pool: np.ndarray, world: int, positions) -> np.ndarray:
    """What is left of `pool` split equally over `world` ranks that consumed `positions` of their shares."""
    ends = np.cumsum(lengths(pool))
    per = int(ends[-1]) // world if len(ends) else 0
    parts = [slice_intervals(pool, r * per + min(int(p), per), (r + 1) * per, ends) for r, p in enumerate(positions)]
    return merge(np.concatenate(parts)) if parts else np.zeros((0, 2), np.int64)
