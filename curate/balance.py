"""Balanced sampling down a cluster tree (Vo et al. 2024): how many samples each finest cluster keeps.

Top-down: the budget is split among the coarsest clusters as evenly as possible, a cluster smaller than its
share keeps all it has and what it leaves goes to the others (water-filling); each cluster's quota is then
split among its children the same way, down to the finest level. So large clusters (a repost storm, a junk
template, an over-represented concept) are cut and small ones (rare concepts) are kept whole.

Water-filling one group: the largest level t with sum(min(size_i, t)) <= budget; every child gets min(size_i, t),
and the budget left over (less than the number of children larger than t) goes one each to children larger
than t in a seeded random order. Vectorised over all groups of a level at once (a binary search on t per group):
O(clusters x log(largest cluster)) per level, no Python loop over clusters.
"""
from __future__ import annotations

import numpy as np


def mix(values: np.ndarray, seed: int) -> np.ndarray:
    """A seeded 64-bit hash of each integer (splitmix64): a random order that is a pure function of the seed."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def waterfill(sizes: np.ndarray, group: np.ndarray, budgets: np.ndarray, seed: int = 0) -> np.ndarray:
    """Quota of each child (sizes[i] items, in group[i]) so that group g's children share budgets[g] as evenly
    as possible; a group whose children hold less than its budget keeps them all."""
    sizes, group = np.asarray(sizes, np.int64), np.asarray(group, np.int64)
    budgets = np.asarray(budgets, np.int64)
    groups = len(budgets)
    lo = np.zeros(groups, np.int64)
    hi = np.zeros(groups, np.int64)
    np.maximum.at(hi, group, sizes)
    while np.any(lo < hi):  # the largest t per group with sum(min(size, t)) <= budget
        mid = (lo + hi + 1) // 2
        fits = np.bincount(group, np.minimum(sizes, mid[group]), minlength=groups) <= budgets
        lo, hi = np.where(fits, mid, lo), np.where(fits, hi, mid - 1)
    quota = np.minimum(sizes, lo[group])
    left = budgets - np.bincount(group, quota, minlength=groups).astype(np.int64)
    eligible = np.flatnonzero(sizes > lo[group])
    if len(eligible):
        order = eligible[np.lexsort((mix(eligible, seed), group[eligible]))]
        g = group[order]
        first = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
        rank = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
        quota[order[rank < left[g]]] += 1
    return quota


def level_sizes_up(sizes0: np.ndarray, parents: list[np.ndarray]) -> list[np.ndarray]:
    """Items under each cluster of every level, from the finest clusters' counts."""
    sizes = [np.asarray(sizes0, np.int64)]
    for p in parents:
        p = np.asarray(p, np.int64)
        sizes.append(np.bincount(p, sizes[-1], minlength=int(p.max()) + 1 if len(p) else 0).astype(np.int64))
    return sizes


def balanced_quotas(sizes0: np.ndarray, parents: list[np.ndarray], budget: int, seed: int = 0) -> np.ndarray:
    """Finest-cluster quotas summing to min(budget, total), split top-down through the tree."""
    sizes = level_sizes_up(sizes0, parents)
    quota = waterfill(sizes[-1], np.zeros(len(sizes[-1]), np.int64), np.array([min(budget, int(sizes[-1].sum()))]),
                      seed)
    for level in range(len(parents) - 1, -1, -1):
        quota = waterfill(sizes[level], np.asarray(parents[level], np.int64), quota, seed + level + 1)
    return quota
