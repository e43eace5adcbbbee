"""Is a finished shard set whole, before anything is appended to it (`--retry-failed`)?

A retry appends shards after the last one its manifest lists, and rewrites the manifests so that
written + rejected = inputs still holds. If the manifest was edited by hand, or shards were removed or
replaced, that would overwrite a published shard or break the accounting halfway. So the set is checked
first, from one listing of DEST and the stats files:
  - each manifest adds up: total_samples and total_bytes are its shards' sums, total_samples + rejected = inputs;
  - each listed shard (and its DALI index and stats file) is there with the listed size;
  - each stats file describes the shard the manifest lists (name, samples, bytes, sha256) for the same run;
  - no shard or stats file sits in DEST unlisted, except the leftovers of a killed retry of this very
    manifest: shards without a stats file, or whose stats file names this manifest (`appended_to`).
"""
from __future__ import annotations

import hashlib
import json
import re

from .output import Destination

SHARD_FILE = re.compile(r"^[A-Za-z0-9_-]+-(\d{6})(?:\.tar|\.parquet|\.idx|_stats\.json)$")
MATCH = ("name", "samples", "bytes", "sha256")
BATCH = 256  # stats files fetched at once (concurrently on S3)


def manifest_digest(raw: bytes) -> str:
    """What a retry's stats files record as `appended_to`: the manifest they were appended to."""
    return hashlib.sha256(raw).hexdigest()


def listing(dest: Destination) -> dict[str, int]:
    """name -> size of the files directly in DEST, from one listing."""
    try:
        dest.fs.invalidate_cache(dest.root)
        found = dest.call(f"list {dest.url}", lambda: dest.fs.ls(dest.root, detail=True))
    except FileNotFoundError:
        return {}
    return {d["name"].rstrip("/").rsplit("/", 1)[-1]: int(d.get("size") or 0) for d in found
            if d.get("type") == "file"}


def _sums(name: str, m: dict) -> list[str]:
    shards = m.get("shards", [])
    problems = []
    for field, key in (("total_samples", "samples"), ("total_bytes", "bytes")):
        held = sum(e.get(key, 0) for e in shards)
        if m.get(field) != held:
            problems.append(f"{name}: {field} {m.get(field)} but its shards hold {held}")
    if m.get("total_samples", 0) + m.get("rejected", 0) != m.get("inputs"):
        problems.append(f"{name}: {m.get('total_samples')} written + {m.get('rejected')} rejected != "
                        f"{m.get('inputs')} inputs")
    return problems


def _files(name: str, m: dict, files: dict[str, int]) -> list[str]:
    problems = []
    for e in m.get("shards", []):
        size = files.get(e["name"])
        if size is None:
            problems.append(f"{e['name']}: missing ({name} lists it)")
        elif size != e.get("bytes"):
            problems.append(f"{e['name']}: {size} bytes, {name} says {e.get('bytes')}")
        for extra in ("index", "stats"):
            if e.get(extra) and e[extra] not in files:
                problems.append(f"{e[extra]}: missing ({name} lists it)")
    return problems


def read_many(dest: Destination, names: list[str]):
    """(name, bytes or None when missing) for each name under DEST, fetched BATCH at a time (concurrently
    on S3)."""
    if any(c in dest.root for c in "*?["):  # fsspec would read these as glob patterns
        yield from ((n, dest.read(n)) for n in names)
        return
    strip = dest.fs._strip_protocol  # the keys fsspec's cat() answers with
    for i in range(0, len(names), BATCH):
        chunk = names[i:i + BATCH]
        got = {strip(k): v for k, v in dest.fs.cat([dest.join(n) for n in chunk], on_error="return").items()}
        for n in chunk:
            data = got.get(strip(dest.join(n)))
            if isinstance(data, Exception) and not isinstance(data, FileNotFoundError):
                data = dest.read(n)  # not a missing file: read it alone, with the storage's retries
            yield n, data if isinstance(data, bytes) else None


def _stats(dest: Destination, manifests: dict[str, dict], fp: str, on_stats) -> list[str]:
    """Each listed stats file against the entries of its shard in every format; `on_stats(doc)` for each."""
    by_stats: dict[str, list[dict]] = {}
    for m in manifests.values():  # the primary format first: its entry is the stats file's `shard`
        for e in m.get("shards", []):
            by_stats.setdefault(e.get("stats") or "", []).append(e)
    problems = []
    for name, raw in read_many(dest, [n for n in by_stats if n]):
        try:
            doc = json.loads(raw or b"")
            held = [doc["shard"]] + doc.get("also", [])
        except (ValueError, KeyError, TypeError):
            problems.append(f"{name}: not a stats file")
            continue
        if doc.get("fingerprint") != fp:
            problems.append(f"{name}: made by another run than manifest.json")
        elif [{k: e.get(k) for k in MATCH} for e in held] != [{k: e.get(k) for k in MATCH} for e in by_stats[name]]:
            problems.append(f"{name} does not match manifest.json (the shard it describes differs)")
        elif on_stats is not None:
            on_stats(doc)
    return problems


def _unlisted(dest: Destination, manifests: dict[str, dict], files: dict[str, int], digest: str) -> list[str]:
    """Shard files in DEST that no manifest lists and that are not a killed retry's leftovers."""
    listed = {e.get(k) for m in manifests.values() for e in m.get("shards", []) for k in ("name", "index", "stats")}
    groups: dict[str, list[str]] = {}
    for name in sorted(files):
        if name not in listed and (match := SHARD_FILE.match(name)):
            groups.setdefault(match.group(1), []).append(name)
    problems = []
    for names in groups.values():
        stats = next((n for n in names if n.endswith("_stats.json")), None)
        if stats is None:
            continue  # a shard whose stats file never came: a killed run's, never part of a finished set
        try:
            appended_to = json.loads(dest.read(stats) or b"{}").get("appended_to")
        except ValueError:
            appended_to = None
        if appended_to != digest:
            shown = next((n for n in names if not n.endswith((".idx", "_stats.json"))), stats)
            problems.append(f"{shown} (with {stats}) is in {dest.url} but not in manifest.json: the manifest "
                            "was edited or is another run's")
    return problems


def problems(dest: Destination, manifests: dict[str, dict], raw_manifest: bytes, on_stats=None) -> list[str]:
    """Every inconsistency between the manifests (format -> manifest, the primary first), the stats files
    and the shards at `dest`; `on_stats(doc)` gets each good stats file (the dedup index is built from them)."""
    files = listing(dest)
    found = _unlisted(dest, manifests, files, manifest_digest(raw_manifest))  # the likeliest cause first
    for i, (fmt, m) in enumerate(manifests.items()):
        name = "manifest.json" if i == 0 else f"manifest-{fmt}.json"
        found += _files(name, m, files) + _sums(name, m)
    fp = next(iter(manifests.values()))["options"].get("fingerprint")
    if not found:  # the stats files are read only for a set whose files are all there
        found += _stats(dest, manifests, fp, on_stats)
    return found
