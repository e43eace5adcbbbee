"""The selection manifest that `train --data DEST` reads (format: pipeline/selection.py), written from the kept
samples' references in bounded memory.

A reference is `shard << 32 | member` (shard: index in the data's shard list). The select stage leaves one
sorted array of kept references per bucket (`kept-<b>.npy` in its work folder); here they are merged a group
of GROUP shards at a time (a slice of each bucket's array, found by binary search in a memory map), and each
group's members go to one members file, DEST/kept/<group>.i32 (little-endian int32, shard after shard).
"""
from __future__ import annotations

import hashlib
import numpy as np
import pyarrow as pa

from mocostream.pipeline.selection import KIND, SHARDS_TABLE

from .layout import MANIFEST, Dest

GROUP = 1024  # shards per members file
SHIFT = 32


def refs(shards: np.ndarray, members: np.ndarray) -> np.ndarray:
    return (np.asarray(shards, np.int64) << SHIFT) | np.asarray(members, np.int64)


def split_refs(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return r >> SHIFT, r & ((1 << SHIFT) - 1)


def _mapped(path: str) -> np.ndarray | None:
    """A sorted reference array, memory-mapped (None when empty: an empty file cannot be mapped)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:
        return None


def write_kept(dest: Dest, bucket_files: list[str], names: dict[int, str], meta: dict) -> tuple[str, int]:
    """Members files, kept/shards.parquet and the manifest (last); returns (selection fingerprint, kept).
    `names`: the data's name of each shard that has embeddings; `meta`: the embeddings' _meta (the data)."""
    arrays = [a for a in map(_mapped, bucket_files) if a is not None]
    h = hashlib.blake2b(meta["data_fingerprint"].encode(), digest_size=16)
    rows = {"shard": [], "name": [], "samples": [], "file": [], "offset": []}
    shards = sorted(names)
    for g in range(0, len(shards), GROUP):
        lo, hi = shards[g], shards[min(g + GROUP, len(shards)) - 1] + 1
        parts = [a[np.searchsorted(a, lo << SHIFT):np.searchsorted(a, hi << SHIFT)] for a in arrays]
        group = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        if not len(group):
            continue
        shard, member = split_refs(group)
        file = f"{g // GROUP:06d}.i32"
        dest.write_bytes(f"kept/{file}", member.astype("<i4").tobytes())
        starts = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1]])
        counts = np.diff(np.r_[starts, len(shard)])
        for s, start, count in zip(shard[starts].tolist(), starts.tolist(), counts.tolist()):
            for key, value in (("shard", s), ("name", names[s]), ("samples", count), ("file", file),
                               ("offset", start)):
                rows[key].append(value)
        h.update(shard[starts].astype(np.int64).tobytes() + counts.astype(np.int64).tobytes())
        h.update(member.astype("<i4").tobytes())
    table = pa.table({"shard": pa.array(rows["shard"], pa.int64()), "name": pa.array(rows["name"], pa.string()),
                      "samples": pa.array(rows["samples"], pa.int64()), "file": pa.array(rows["file"], pa.string()),
                      "offset": pa.array(rows["offset"], pa.int64())})
    dest.write_table(SHARDS_TABLE, table)
    kept = int(sum(rows["samples"]))
    return h.hexdigest(), kept


def write_manifest(dest: Dest, meta: dict, fingerprint: str, inputs: int, kept: int) -> None:
    """DEST/manifest.json, written last: its presence means the selection is complete."""
    dest.write_json(MANIFEST, {
        "format_version": 1, "kind": KIND, "created_by": "mocostream curate",
        "data": meta["data"], "data_shards": meta["data_shards"], "data_fingerprint": meta["data_fingerprint"],
        "fingerprint": fingerprint, "shards_table": SHARDS_TABLE, "inputs": inputs, "total_samples": kept})
