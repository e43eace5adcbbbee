"""Sample keys shared between the parts of a merge, found in memory that does not grow with the set.

Each part's keys (written samples from its stats files, rejects from its rejects.jsonl) become sorted
64-bit hashes in a temporary file (one part in memory at a time); then the hash space is walked in
buckets, each holding about BUCKET hashes of all parts together. A hash seen twice is a candidate; at a
billion keys two distinct keys share a 64-bit hash with a few percent odds, so the candidates are
confirmed by reading the parts' keys once more and comparing the keys themselves.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from typing import Callable, Iterable, Iterator

import numpy as np

from .consistency import read_many

BUCKET = 1 << 24   # hashes compared at once (128 MB)


def part_keys(dest, folder: str, stats_names: list[str], reject_keys: Iterable[str]) -> Iterator[str]:
    """A finished part's keys: its written samples (stats files), then its rejects."""
    for name, data in read_many(dest, [f"{folder}/{n}" for n in stats_names]):
        if data is None:
            raise FileNotFoundError(dest.location(name))
        yield from (w[0] for w in json.loads(data).get("written", []))
    yield from reject_keys


def _hash(key: str) -> int:
    return hash(key) & 0xFFFF_FFFF_FFFF_FFFF  # 64 bits, stable within this process: all the comparison needs


def _hashes(keys: Iterable[str]) -> np.ndarray:
    return np.sort(np.fromiter(map(_hash, keys), dtype=np.uint64))


def _buckets(arrays: list[np.ndarray], total: int) -> Iterator[list[np.ndarray]]:
    count = max(1, -(-total // BUCKET))
    edges = [np.uint64((b << 64) // count) for b in range(1, count)]
    lo = [0] * len(arrays)
    for b in range(count):
        hi = [int(np.searchsorted(a, edges[b])) if b < count - 1 else len(a) for a in arrays]
        yield [a[x:y] for a, x, y in zip(arrays, lo, hi)]
        lo = hi


def _candidates(parts: list[tuple[str, Callable[[], Iterable[str]]]]) -> set[int]:
    """Hashes that occur more than once over all parts."""
    with tempfile.TemporaryDirectory(prefix="mocostream-merge-") as tmp:
        files = []
        for i, (_, keys) in enumerate(parts):
            files.append(os.path.join(tmp, f"{i}.npy"))
            np.save(files[-1], _hashes(keys()))
        arrays = [np.load(f, mmap_mode="r") for f in files]
        found: set[int] = set()
        for chunk in _buckets(arrays, sum(len(a) for a in arrays)):
            joined = np.sort(np.concatenate(chunk))
            found.update(int(h) for h in np.unique(joined[1:][joined[1:] == joined[:-1]]))
        del arrays, chunk
    return found


def shared_keys(parts: list[tuple[str, Callable[[], Iterable[str]]]]) -> tuple[int, list[str]]:
    """(number of keys found in more than one part or twice in one, the names of the parts holding them).
    `parts`: (name, a function giving that part's keys: called once, and again only if hashes collide)."""
    candidates = _candidates(parts)
    if not candidates:
        return 0, []
    seen: dict[str, Counter] = {}
    for name, keys in parts:
        for key in keys():
            if _hash(key) in candidates:
                seen.setdefault(key, Counter())[name] += 1
    shared = {k: c for k, c in seen.items() if sum(c.values()) > 1}
    return len(shared), sorted({name for c in shared.values() for name in c})
