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
