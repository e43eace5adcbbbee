"""Sample keys shared between the parts of a merge, found in memory that does not grow with the set.

Each part's keys (written samples from its stats files, rejects from its rejects.jsonl) become sorted
64-bit hashes in a temporary file (one part in memory at a time); then the hash space is walked in
buckets, each holding about BUCKET hashes of all parts together. Keys are unique within a part, so a hash
seen twice in a bucket is a key two parts share (or, at 2^-64 odds per pair, a hash collision).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Iterable, Iterator

import numpy as np

from .consistency import read_many

BUCKET = 1 << 24   # hashes compared at once (128 MB)


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


def part_keys(dest, folder: str, stats_names: list[str], reject_keys: Iterable[str]) -> Iterator[str]:
    """A finished part's keys: its written samples (stats files), then its rejects."""
    for name, data in read_many(dest, [f"{folder}/{n}" for n in stats_names]):
        if data is None:
            raise FileNotFoundError(dest.location(name))
        yield from (w[0] for w in json.loads(data).get("written", []))
    yield from reject_keys


def _buckets(arrays: list[np.ndarray], total: int) -> Iterator[list[np.ndarray]]:
    count = max(1, -(-total // BUCKET))
    edges = [np.uint64(min((b << 64) // count, (1 << 64) - 1)) for b in range(1, count)]
    lo = [0] * len(arrays)
    for b in range(count):
        hi = [int(np.searchsorted(a, edges[b])) if b < count - 1 else len(a) for a in arrays]
        yield [a[x:y] for a, x, y in zip(arrays, lo, hi)]
        lo = hi


def shared_keys(parts: list[tuple[str, Iterable[str]]]) -> tuple[int, list[str]]:
    """(number of keys found in more than one part or twice in one, the names of the parts involved)."""
    with tempfile.TemporaryDirectory(prefix="mocostream-merge-") as tmp:
        files = []
        for i, (_, keys) in enumerate(parts):
            arr = np.fromiter((key_hash(k) for k in keys), dtype=np.uint64)
            arr.sort()
            files.append(os.path.join(tmp, f"{i}.npy"))
            np.save(files[-1], arr)
            del arr
        arrays = [np.load(f, mmap_mode="r") for f in files]
        shared, involved = 0, set()
        for chunk in _buckets(arrays, sum(len(a) for a in arrays)):
            joined = np.sort(np.concatenate(chunk)) if chunk else np.empty(0, np.uint64)
            dup = np.unique(joined[1:][joined[1:] == joined[:-1]])
            if len(dup):
                shared += len(dup)
                involved |= {parts[i][0] for i, c in enumerate(chunk) if np.isin(dup, c).any()}
        del arrays
    return shared, sorted(involved)
