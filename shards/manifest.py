"""manifest.json, rejects.jsonl and report.json: what a shard set contains, what was left out, how it went.

`DEST/manifest.json` (written LAST, so its presence means the set is complete)::

    {
      "format_version": 1,
      "format": "tar" | "parquet",
      "created_by": "mocostream",
      "options": {"format", "samples_per_shard", "max_shard_bytes", "prefix", "min_size", "max_size",
                  "quality", "reencode", "max_pixels", "dedup", "dedup_threshold", "shuffle", "seed",
                  "part": "i/N", "sources": [...], "fingerprint": "<sha256>",
                  "validated_by": {"check_version", "decoder", "max_pixels"},   # pipeline.image_check
                  "source_ids": ["<size>:<sha256 of both ends>" | "<n> files:<sha256 of the listing>", ...]},
      "shards": [
        {"name": "shard-000000.tar", "samples": N, "bytes": B, "sha256": "<hex>",
         "index": "shard-000000.idx",             # tar only: the DALI index next to it
         "stats": "shard-000000_stats.json"}      # per-shard accounting (shards.stats)
      ],
      "inputs": I,                                 # inputs of this run (this part)
      "total_samples": N,                          # sum of shards[].samples
      "total_bytes": B,                            # sum of shards[].bytes (index files not counted)
      "rejected": R,                               # lines in rejects.jsonl; total_samples + rejected == inputs
      "rejected_by_reason": {"truncated": 3, ...}, # only reasons that occurred
      "classes": ["n01440764", ...],               # sorted distinct sample labels ([] when none): the class
                                                   #   names a reader indexes without reading every shard
      "created_at": "2026-01-01T00:00:00Z",        # timing fields: the only ones that differ
      "seconds": 1.23                              #   between two runs on the same inputs
    }

`DEST/manifest.parquet` (before manifest.json): the same shard list as columns `name`, `samples`, `bytes`,
`sha256` (32 raw bytes), which the trainer reads instead of the JSON; its metadata records the JSON's size.

`names` are relative to DEST (after `shards merge`: `part-00000-of-00004/shard-000000.tar`).

Several formats in one run (`--format tar,parquet`): each format is a complete shard set of its own, with
the same samples, keys and order (shard N of each holds the same samples), described by its own manifest:
`manifest.json` for the first (primary) format, `manifest-<format>.json` for each other one. Both carry
`"formats": {"tar": "manifest.json", "parquet": "manifest-parquet.json"}`. So every reader of a
single-format manifest (the trainer's `--data DEST`) reads one copy of the data, never both;
`--data DEST/manifest-parquet.json` picks the other format. manifest.json is still written last.

`DEST/rejects.jsonl`: one line per rejected input, in processing order::

    {"source": "<path or URL as given>", "reason": "<code>", "detail": "<short message>"}

with reason in shards.validate.REASONS (a `duplicate` names the kept key in its detail).

`DEST/report.json`: the run report (counts per reason, bytes in/out, duration, images/s), see `run_report`.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter

FORMAT_VERSION = 1  # additive changes only: readers of version 1 read these


def file_digest(path: str) -> tuple[int, str]:
    """(bytes, sha256 hex) of a local file, streamed."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def by_reason(rejected) -> dict[str, int]:
    return dict(sorted(Counter(r[1] for r in rejected).items()))


def manifest_names(formats) -> dict[str, str]:
    """Each format's manifest file: manifest.json for the first (primary), manifest-<fmt>.json for the others."""
    return {f: "manifest.json" if i == 0 else f"manifest-{f}.json" for i, f in enumerate(formats)}


def build_manifest(fmt: str, options: dict, shards: list[dict], rejected: list, seconds: float,
                   inputs: int | None = None, formats=None, classes: list[str] | None = None) -> dict:
    total = sum(s["samples"] for s in shards)
    return {
        "format_version": FORMAT_VERSION,
        "format": fmt,
        **({"formats": manifest_names(formats)} if formats and len(formats) > 1 else {}),
        "created_by": "mocostream",
        "options": options,
        "shards": shards,
        "inputs": inputs if inputs is not None else total + len(rejected),
        "total_samples": total,
        "total_bytes": sum(s["bytes"] for s in shards),
        "rejected": len(rejected),
        "rejected_by_reason": by_reason(rejected),
        **({"classes": classes} if classes is not None else {}),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 3),
    }


def run_report(manifest: dict, bytes_in: int, seconds: float, processed: int, resumed_from: int,
               workers: int, replaced_workers: int, manifest_url: str, others: dict | None = None,
               checker: str = "", cpu: dict | None = None) -> dict:
    """What a job logs: counts per reason, bytes in/out, duration and rate of THIS run. `others`: the
    manifests of the other formats (bytes_out is the primary format's; `formats` lists each)."""
    extra = {}
    if others:
        extra["formats"] = {f: {"shards": len(m["shards"]), "bytes_out": m["total_bytes"]}
                            for f, m in {manifest["format"]: manifest, **others}.items()}
    if checker:
        extra["dali_check"] = checker
    if cpu is not None:  # {"main", "workers"}: the main process writes every shard, its share limits scaling
        extra["cpu_seconds"] = {k: round(v, 3) for k, v in cpu.items()}
    return {
        "inputs": manifest["inputs"],
        "written": manifest["total_samples"],
        "rejected": manifest["rejected"],
        "rejected_by_reason": manifest["rejected_by_reason"],
        "shards": len(manifest["shards"]),
        "bytes_in": bytes_in,
        "bytes_out": manifest["total_bytes"],
        "seconds": round(seconds, 3),
        "processed_this_run": processed,
        "resumed_from": resumed_from,
        "images_per_second": round(processed / seconds, 1) if seconds > 0 else 0.0,
        "workers": workers,
        "replaced_workers": replaced_workers,
        "manifest": manifest_url,
        **extra,
    }


def json_bytes(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def columnar_bytes(manifest: dict, json_size: int) -> bytes:
    """The shard list of `manifest` as parquet (name, samples, bytes, sha256): what a trainer reads instead of
    parsing the JSON (a million shards: a few MB of columns instead of ~250 MB of JSON). `json_size` (the JSON's
    bytes) lets a reader tell a columnar manifest that no longer matches its JSON."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = manifest["shards"]
    table = pa.table({
        "name": pa.array([s["name"] for s in shards], pa.string()),
        "samples": pa.array([s["samples"] for s in shards], pa.int64()),
        "bytes": pa.array([s["bytes"] for s in shards], pa.int64()),
        "sha256": pa.array([bytes.fromhex(s["sha256"]) for s in shards], pa.binary(32)),
    }).replace_schema_metadata({"mocostream_manifest": json.dumps({
        "json_bytes": json_size, "validated_by": manifest["options"].get("validated_by")})})
    out = io.BytesIO()
    pq.write_table(table, out, row_group_size=65536, use_dictionary=False)  # unique names and digests
    return out.getvalue()


def write_manifests(dest, names: dict[str, str], manifests: dict[str, dict]) -> None:
    """Each format's manifest.json with its columnar twin (manifest.parquet) written first; the primary
    format's manifest.json last: its presence marks the set complete."""
    for fmt in reversed(list(names)):
        data = json_bytes(manifests[fmt])
        dest.write_bytes(names[fmt][: -len(".json")] + ".parquet", columnar_bytes(manifests[fmt], len(data)))
        dest.write_bytes(names[fmt], data)
