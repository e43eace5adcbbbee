"""How many clusters each level of the tree has: a rule from the data's size, or the user's list.

Rule (Vo et al. 2024 use ~120 images per finest cluster and a factor 5-20 between levels):
  finest k0 = round(n / cluster_size), at least 1 and at most fit_n / MIN_FIT_PER_CLUSTER (every centroid is
  fitted on at least that many sample points); each level above k_{i+1} = round(k_i / level_ratio), added while
  it is at least 2, up to max_levels levels. Level 0 is the finest.
"""
from __future__ import annotations

from .layout import CurateError

MIN_FIT_PER_CLUSTER = 10


def rule_text(cluster_size: int, level_ratio: int, max_levels: int) -> str:
    return (f"k0 = round(n / {cluster_size}) (at least 1, at most fit sample / {MIN_FIT_PER_CLUSTER}); "
            f"k(i+1) = round(k(i) / {level_ratio}) while >= 2, at most {max_levels} levels")


def level_sizes(n: int, fit_n: int, cluster_size: int = 100, level_ratio: int = 10, max_levels: int = 4) -> list[int]:
    if cluster_size < 1 or level_ratio < 2 or max_levels < 1:
        raise CurateError("--cluster-size must be >= 1, --level-ratio >= 2, --max-levels >= 1")
    k = max(1, min(round(n / cluster_size), max(1, fit_n // MIN_FIT_PER_CLUSTER)))
    levels = [k]
    while len(levels) < max_levels and round(levels[-1] / level_ratio) >= 2:
        levels.append(round(levels[-1] / level_ratio))
    return levels


def parse_levels(text: str) -> list[int]:
    """`--levels 1000,100,10`: finest first, strictly decreasing, each at least 1."""
    try:
        levels = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise CurateError(f"--levels takes cluster counts, finest first (e.g. 1000,100,10), got {text!r}") from None
    if not levels or any(k < 1 for k in levels) or any(b >= a for a, b in zip(levels, levels[1:])):
        raise CurateError(f"--levels must be positive and strictly decreasing, finest first, got {text!r}")
    return levels


def check_levels(levels: list[int], n: int, fit_n: int) -> None:
    if levels[0] > fit_n:
        raise CurateError(f"--levels: {levels[0]} finest clusters cannot be fitted on {fit_n} sample vectors "
                          f"(the data has {n}; raise --fit-sample or use fewer clusters)")
