"""`shards verify DEST`: check every shard against the manifest, down to every sample decoding.

Checks per shard: present, byte size, sha256, sample count, every sample complete (image + json for
tar; an image cell for parquet) and decodable end to end by PIL; for tar, the DALI index present and
equal to the one the tar implies. A set written in several formats (manifest.json + manifest-<fmt>.json)
is checked in each, and the formats must hold the same keys in the same shards and order.
Problems come back as one line each; none means the set is good.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import warnings
from typing import Callable, Iterator

from PIL import Image

from mocostream.pipeline.filesystems import Storage

from .errors import ShardError
from .output import Destination
from .wds_index import INDEX_VERSION, index_lines, split_name

IMAGE_EXTS = ("jpg", "png", "webp")


def read_manifest(dest: Destination) -> dict:
    raw = dest.read("manifest.json")
    if raw is None:
        raise ShardError(f"no manifest.json in {dest.url}: not a finished shard set")
    try:
        m = json.loads(raw)
        m["shards"][0:0]
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"{dest.location('manifest.json')} is not a shard manifest: {exc}") from None
    return m


def tar_samples(data: bytes) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, in member order (webdataset's grouping rule)."""
    key, parts = None, {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for m in tf:
            if not m.isreg():
                continue
            base, ext = split_name(m.name)
            if base != key and key is not None:
                yield key, parts
                parts = {}
            key = base
            parts[ext] = tf.extractfile(m).read()
    if key is not None:
        yield key, parts


def parquet_samples(data: bytes) -> Iterator[tuple[str, dict[str, bytes]]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(io.BytesIO(data))
    for rg in range(pf.num_row_groups):
        t = pf.read_row_group(rg, columns=["key", "image", "ext"]).to_pylist()
        for row in t:
            yield row["key"], {row["ext"] or "jpg": row["image"] or b""}


def decode_problem(parts: dict[str, bytes], fmt: str) -> str | None:
    exts = [e for e in parts if e in IMAGE_EXTS]
    if len(exts) != 1:
        return f"has {sorted(parts)}; expected one of {IMAGE_EXTS}" + (" and json" if fmt == "tar" else "")
    if fmt == "tar" and "json" not in parts:
        return "has no .json"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(parts[exts[0]])) as im:
                im.load()
    except Exception as exc:
        return f"does not decode: {type(exc).__name__}: {exc}"
    return None


def verify_shard(dest: Destination, entry: dict, fmt: str, decode: bool = True,
                 keys: list | None = None) -> list[str]:
    """Problems of one shard; its sample keys are appended to `keys` when given."""
    name = entry["name"]
    data = dest.read(name)
    if data is None:
        return [f"{name}: missing"]
    problems = []
    if len(data) != entry.get("bytes"):
        problems.append(f"{name}: {len(data)} bytes, manifest says {entry.get('bytes')}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.get("sha256"):
        problems.append(f"{name}: sha256 {digest[:12]}..., manifest says {str(entry.get('sha256'))[:12]}...")
    reader = tar_samples if name.endswith(".tar") else parquet_samples
    count = 0
    try:
        for key, parts in reader(data):
            count += 1
            if keys is not None:
                keys.append(key)
            if decode and (why := decode_problem(parts, "tar" if name.endswith(".tar") else "parquet")):
                problems.append(f"{name}: sample {key} {why}")
    except Exception as exc:  # not a tar / parquet at all, or cut short
        problems.append(f"{name}: unreadable after {count} samples: {type(exc).__name__}: {exc}")
    if count != entry.get("samples"):
        problems.append(f"{name}: {count} samples, manifest says {entry.get('samples')}")
    if entry.get("index"):
        idx = dest.read(entry["index"])
        if idx is None:
            problems.append(f"{entry['index']}: missing (DALI needs it)")
        elif not problems:
            import os
            import tempfile
            with tempfile.NamedTemporaryFile(suffix=".tar", delete=False) as f:
                f.write(data)
            try:
                lines = index_lines(f.name)
            finally:
                os.unlink(f.name)
            expected = "".join(x + "\n" for x in [f"{INDEX_VERSION} {len(lines)}"] + lines)
            if idx.decode(errors="replace") != expected:
                problems.append(f"{entry['index']}: does not match its tar")
    return problems


def _verify_set(dest: Destination, name: str, m: dict, decode: bool, on_shard) -> tuple[list[str], list[list]]:
    """Problems of one format's shard set (manifest `name`), and the keys of each of its shards."""
    problems, keys = [], []
    for entry in m["shards"]:
        keys.append([])
        found = verify_shard(dest, entry, m.get("format", "tar"), decode, keys[-1])
        problems += found
        if on_shard:
            on_shard(entry, found)
    total = sum(e.get("samples", 0) for e in m["shards"])
    if m.get("total_samples") != total:
        problems.append(f"{name}: total_samples {m.get('total_samples')} but its shards hold {total}")
    return problems, keys


def verify(url: str, decode: bool = True, on_shard: Callable[[dict, list[str]], None] | None = None,
           storage: Storage | None = None) -> list[str]:
    """Every problem found in the shard set at `url`, in every format it was written in (empty list: all good).
    `storage`: how it is read (default: the default settings)."""
    dest = Destination(url, create=False, storage=storage or Storage())
    m = read_manifest(dest)
    problems, first_keys = _verify_set(dest, "manifest.json", m, decode, on_shard)
    for fmt, name in m.get("formats", {}).items():
        if name == "manifest.json":
            continue
        raw = dest.read(name)
        if raw is None:
            problems.append(f"{name}: missing (manifest.json lists it for {fmt})")
            continue
        other = json.loads(raw)
        found, keys = _verify_set(dest, name, other, decode, on_shard)
        problems += found
        if other.get("options", {}).get("fingerprint") != m.get("options", {}).get("fingerprint"):
            problems.append(f"{name}: made by another run than manifest.json")
        elif keys != first_keys and not found:
            shard = next((i for i, (a, b) in enumerate(zip(keys, first_keys)) if a != b), min(len(keys), len(first_keys)))
            problems.append(f"{name}: shard {shard} does not hold the same samples as in manifest.json")
    return problems
