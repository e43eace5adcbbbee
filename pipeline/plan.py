"""Which samples each rank reads in an epoch, and in what order: a pure function of
(shard sizes, seed, epoch, world size, rank), so every restart can recompute it.

1. The shard list is shuffled with the epoch's seed.
2. The epoch's samples, laid end to end in that order, are cut into `world` equal contiguous spans
   (the last `total % world` samples of the epoch are dropped and counted, so every rank gets
   exactly the same number of samples: no rank can run dry and hang the others at a collective).
3. Each rank reads its span in blocks of `shuffle_shards` consecutive shard pieces and shuffles the
   samples within a block: a bounded in-memory shuffle that mixes several shards at a time.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Piece:
    shard: int  # index into the shard list
    start: int  # first sample index within the shard
    stop: int


@dataclass(frozen=True)
class Block:
    pieces: tuple[Piece, ...]
    order: tuple[int, ...]  # a permutation of range(size): the read order of the block's samples

    @property
    def size(self) -> int:
        return len(self.order)

    def sample_at(self, i: int) -> tuple[int, int]:
        """(shard index, sample index within shard) of the i-th sample read from this block."""
        j = self.order[i]
        for p in self.pieces:
            n = p.stop - p.start
            if j < n:
                return p.shard, p.start + j
            j -= n
        raise IndexError(i)


def _rng(*parts) -> random.Random:
    return random.Random("-".join(str(p) for p in parts))


def samples_per_rank(counts: list[int], world: int) -> int:
    return sum(counts) // world


def dropped_per_epoch(counts: list[int], world: int) -> int:
    return sum(counts) % world


def rank_pieces(counts: list[int], seed: int, epoch: int, world: int, rank: int) -> list[Piece]:
    order = list(range(len(counts)))
    _rng(seed, epoch, "shards").shuffle(order)
    per_rank = samples_per_rank(counts, world)
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    pieces, offset = [], 0
    for s in order:
        a, b = max(lo, offset), min(hi, offset + counts[s])
        if a < b:
            pieces.append(Piece(s, a - offset, b - offset))
        offset += counts[s]
        if offset >= hi:
            break
    return pieces


def rank_blocks(counts: list[int], seed: int, epoch: int, world: int, rank: int,
                shuffle_shards: int) -> Iterator[Block]:
    pieces = rank_pieces(counts, seed, epoch, world, rank)
    for b in range(0, len(pieces), shuffle_shards):
        group = tuple(pieces[b : b + shuffle_shards])
        order = list(range(sum(p.stop - p.start for p in group)))
        _rng(seed, epoch, rank, world, b, "samples").shuffle(order)
        yield Block(group, tuple(order))


# ---- Elastic resume ------------------------------------------------------------------------------
# An epoch in progress may be resumed with another number of ranks. The samples not yet consumed are
# then re-split equally over the new ranks: a new "level" of the epoch's plan. Every level is a list of
# intervals over the epoch's level-0 sequence (the ranks' level-0 sequences laid end to end), so the whole
# history of an epoch is a few (world, positions) pairs and nothing per sample is stored.

Interval = tuple[int, int]


@dataclass(frozen=True)
class Level:
    world: int
    positions: tuple[int, ...]  # samples each rank had consumed of its share at this level


@dataclass(frozen=True)
class Segment:
    rank0: int  # the level-0 rank whose block this is
    block: int  # index of the block in that rank's level-0 blocks
    start: int  # read positions start..stop of the block's order
    stop: int


def _length(intervals: list[Interval]) -> int:
    return sum(b - a for a, b in intervals)


def _slice(intervals: list[Interval], lo: int, hi: int) -> list[Interval]:
    """Entries lo..hi of the concatenation of `intervals`."""
    out, offset = [], 0
    for a, b in intervals:
        n = b - a
        s, e = max(lo, offset), min(hi, offset + n)
        if s < e:
            out.append((a + s - offset, a + e - offset))
        offset += n
        if offset >= hi:
            break
    return out


class EpochPlan:
    """One epoch's plan: which level-0 entries each rank reads, after any elastic re-splits."""

    def __init__(self, counts: list[int], seed: int, epoch: int, shuffle_shards: int, base_world: int):
        self.counts, self.seed, self.epoch = counts, seed, epoch
        self.shuffle_shards, self.base_world = shuffle_shards, base_world
        self.per0 = samples_per_rank(counts, base_world)
        self._blocks: dict[int, tuple[list[Block], list[int]]] = {}

    def blocks(self, rank0: int) -> tuple[list[Block], list[int]]:
        if rank0 not in self._blocks:
            blocks = list(rank_blocks(self.counts, self.seed, self.epoch, self.base_world, rank0, self.shuffle_shards))
            starts, offset = [], 0
            for b in blocks:
                starts.append(offset)
                offset += b.size
            self._blocks[rank0] = (blocks, starts)
        return self._blocks[rank0]

    def pool(self, history: list[Level]) -> tuple[list[Interval], int]:
        """The entries left for the current level, and how many earlier levels dropped to stay balanced."""
        intervals: list[Interval] = [(0, self.per0 * self.base_world)]
        dropped = 0
        for level in history:
            per = _length(intervals) // level.world
            dropped += _length(intervals) - per * level.world
            rest = []
            for r in range(level.world):
                rest += _slice(intervals, r * per + level.positions[r], (r + 1) * per)
            intervals = rest
        return intervals, dropped

    def share(self, history: list[Level], world: int, rank: int) -> list[Interval]:
        intervals, _ = self.pool(history)
        per = _length(intervals) // world
        return _slice(intervals, rank * per, (rank + 1) * per)

    def share_length(self, history: list[Level], world: int) -> int:
        return _length(self.pool(history)[0]) // world

    def remainder(self, history: list[Level], world: int) -> int:
        """Entries of this level dropped so that every rank gets the same number."""
        return _length(self.pool(history)[0]) % world

    def segments(self, intervals: list[Interval]) -> list[Segment]:
        """The intervals as runs within single blocks, in read order."""
        import bisect

        out = []
        for a, b in intervals:
            while a < b:
                r, j = divmod(a, self.per0)
                blocks, starts = self.blocks(r)
                k = bisect.bisect_right(starts, j) - 1
                take = min(b - a, starts[k] + blocks[k].size - j)
                out.append(Segment(r, k, j - starts[k], j - starts[k] + take))
                a += take
        return out
