"""Where shards live: resolve a data spec to a shard list and read shard bytes through fsspec.

A data spec is one of
  - a manifest: `.../manifest.json`, or a folder / `s3://` prefix that holds one;
  - a brace pattern: `s3://bucket/shard-{000000..000099}.tar`;
  - a comma-separated list of shard URLs.
Every read goes through the caller's `Storage` (filesystems.py): its S3 endpoint, timeouts and
external-shard policy. Each call here is one attempt; callers wrap whole operations in `Storage.retrying`.
"""
from __future__ import annotations


import json
import logging

import braceexpand

from .filesystems import Storage
from .readers import read_samples
from .shard import Shard

log = logging.getLogger(__name__)

SHARD_FORMATS = {".tar": "tar", ".parquet": "parquet"}


class DataSpecError(ValueError):
    """The data spec names nothing readable; a user error, reported in one line."""

    user_error = True


def shard_format(url: str) -> str:
    for suffix, fmt in SHARD_FORMATS.items():
        if url.endswith(suffix):
            return fmt
    raise DataSpecError(f"not a shard (expected .tar or .parquet): {url}")


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def read_manifest(url: str, *, storage: Storage) -> list[Shard]:
    try:
        fs, path = storage.filesystem(url)
        manifest = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise DataSpecError(f"manifest not found: {url}") from None
    except json.JSONDecodeError as e:
        raise DataSpecError(f"manifest is not valid JSON: {url} ({e})") from None
    if isinstance(manifest, dict) and manifest.get("kind") == "selection":
        raise DataSpecError(f"{url} is a curated selection (mocostream curate) of {manifest.get('data')}: "
                            "`train --data` reads it; give this command that data")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise DataSpecError(f"manifest has no 'shards' list: {url}")
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    entries = manifest["shards"]
    for i, entry in enumerate(entries):
        _check_entry_types(entry, f"manifest {url}, shard entry {i}")
    names = [e["name"] for e in entries]
    sizes = [-1 if e.get("bytes") is None else e["bytes"] for e in entries]
    external = check_shard_columns(names, [e["samples"] for e in entries], sizes, url,
                                   storage.allow_external_shards)
    stamp = (manifest.get("options") or {}).get("validated_by")
    return [Shard(name if out else _join(base, name), e["samples"], shard_format(name), e.get("bytes"),
                  e.get("sha256"), stamp) for name, e, out in zip(names, entries, external.tolist())]


# A tar sample is at least one member: a 512-byte header and a 512-byte block of data.
MIN_SAMPLE_BYTES = {"tar": 1024, "parquet": 1}
# A name that leaves the manifest's folder: a URL, an absolute path, or a `..` path part.
EXTERNAL_NAME = r"://|^/|(^|[/\\])\.\.([/\\]|$)"


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry_types(entry, where: str) -> None:
    """The JSON-only part of an entry's checks: its fields have the types a columnar manifest's columns fix."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise DataSpecError(f"{where}: needs a 'name' string, got {str(entry)[:100]}")
    samples, size = entry.get("samples"), entry.get("bytes")
    if not _is_count(samples) or samples >= 2**63:  # beyond int64: not a count that any shard holds
        raise DataSpecError(f"{where} ({entry['name']}): 'samples' must be a positive integer, got {samples!r}")
    if size is not None and (not _is_count(size) or not 0 <= size < 2**63):
        raise DataSpecError(f"{where} ({entry['name']}): 'bytes' must be a non-negative integer, got {size!r}")


def check_shard_columns(names, samples, sizes, url: str, allow_external: bool):
    """The manifest rules, vectorised over a whole shard list (JSON or columnar): a manifest is input like
    any other and may be hostile. Names resolve under the manifest's own location (no `..`, absolute paths
    or URLs unless allowed) and name a shard format; sample counts are positive integers that fit in the
    shard's bytes (a claim of millions would size the plan). `sizes`: -1 = unknown. `allow_external`: the
    storage's policy (--allow-external-shards). Raises DataSpecError naming the first bad entry; returns
    the mask of external names."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    names = names if isinstance(names, (pa.Array, pa.ChunkedArray)) else pa.array(names, pa.string())
    samples, sizes = np.asarray(samples), np.asarray(sizes)
    if len(names) == 0:
        return np.zeros(0, bool)

    def fail(bad, message) -> None:
        if bad.any():
            i = int(np.argmax(bad))
            name = names[i].as_py()
            raise DataSpecError(f"manifest {url}, shard entry {i} ({name}): " + message(i, name))

    external = pc.match_substring_regex(names, EXTERNAL_NAME).to_numpy(zero_copy_only=False)
    if not allow_external:
        fail(external, lambda i, name: f"shard {name!r} is outside the manifest's folder (pass "
                                       "--allow-external-shards to read it)")
    is_tar = pc.ends_with(names, ".tar").to_numpy(zero_copy_only=False)
    fail(~is_tar & ~pc.ends_with(names, ".parquet").to_numpy(zero_copy_only=False),
         lambda i, name: "not a shard (expected .tar or .parquet)")
    if samples.dtype.kind not in "iu":  # a float column: no count is a float
        fail(np.ones(len(samples), bool),
             lambda i, _: f"'samples' must be a positive integer, got {samples[i].item()!r}")
    fail(samples < 1, lambda i, _: f"'samples' must be a positive integer, got {int(samples[i])}")
    fail(sizes < -1, lambda i, _: f"'bytes' must be a non-negative integer, got {int(sizes[i])}")
    per_sample = np.where(is_tar, MIN_SAMPLE_BYTES["tar"], MIN_SAMPLE_BYTES["parquet"])
    fail((sizes >= 0) & (samples > sizes // per_sample),  # a division: no overflow on a huge count
         lambda i, _: f"{int(samples[i])} samples cannot fit in {int(sizes[i])} bytes")
    return external


def resolve_shards(spec: str, *, storage: Storage) -> list[Shard]:
    """Turn a data spec into shards, in a stable order."""
    spec = spec.strip()
    if not spec:
        raise DataSpecError("no data given (--data)")
    if spec.endswith(".json"):
        return read_manifest(spec, storage=storage)
    if "," not in spec and "{" not in spec and not spec.endswith((".tar", ".parquet")):
        # A folder or prefix: prefer its manifest, else list its shards.
        fs, path = storage.filesystem(spec)
        manifest = _join(spec, "manifest.json")
        if fs.exists(_join(path, "manifest.json")):
            return read_manifest(manifest, storage=storage)
        if not fs.exists(path):
            raise DataSpecError(f"data not found: {spec}")
        names = sorted(p for p in fs.ls(path, detail=False)  # not a columnar manifest left by an unfinished set
                       if p.endswith((".tar", ".parquet")) and not p.rsplit("/", 1)[-1].startswith("manifest"))
        if not names:
            raise DataSpecError(f"no manifest.json and no .tar/.parquet shards in {spec}")
        prefix = spec.split("://")[0] + "://" if "://" in spec else ""
        urls = [prefix + n if prefix and not n.startswith(prefix) else n for n in names]
    else:
        urls = [u for part in spec.split(",") for u in braceexpand.braceexpand(part.strip()) if u]
    return [Shard(u, None, shard_format(u)) for u in urls]


def count_samples(shard: Shard, *, storage: Storage, data: bytes | None = None) -> int:
    """Samples in a shard without a manifest entry: parquet metadata, else the DALI index, else a scan."""
    fs, path = storage.filesystem(shard.url)
    if shard.format == "parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    idx = path[: -len(".tar")] + ".idx"
    if fs.exists(idx):
        lines = fs.cat_file(idx).decode().splitlines()
        return int(lines[0].split()[1]) if lines and lines[0].startswith("v1") else len(lines)
    return sum(1 for _ in read_samples(shard, data if data is not None else fs.cat_file(path)))


def with_counts(shards: list[Shard], *, storage: Storage, on_missing=None) -> list[Shard]:
    """Fill in unknown sample counts (one metadata read per shard; manifests avoid this). `on_missing()`
    is called for each shard that does not exist (a failed shard, for the metrics)."""
    if all(s.samples is not None for s in shards):
        return shards
    out = []
    for s in shards:
        try:
            out.append(s if s.samples is not None
                       else Shard(s.url, count_samples(s, storage=storage), s.format, s.bytes, s.sha256))
        except FileNotFoundError:  # one missing shard of a pattern or list costs only itself
            log.error("shard not found, skipped: %s", s.url)
            if on_missing is not None:
                on_missing()
    if shards and not out:
        raise DataSpecError(f"none of the {len(shards)} shards exists (first: {shards[0].url})")
    return out


__all__ = ["Shard", "DataSpecError", "resolve_shards", "read_manifest", "with_counts"]
