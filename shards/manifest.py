"""manifest.json and rejects.jsonl: what a shard set contains, and what was left out.

`DEST/manifest.json` (written LAST, so its presence means the set is complete)::

    {
      "format_version": 1,
      "format": "tar" | "parquet",
      "created_by": "mocostream",
      "options": {"format", "samples_per_shard", "prefix", "sources": [...],
                  "min_side", "max_pixels", "jpeg_quality"},
      "shards": [
        {"name": "shard-000000.tar", "samples": N, "bytes": B, "sha256": "<hex>",
         "index": "shard-000000.idx"}            # "index" only for tar: the DALI index next to it
      ],
      "total_samples": N,                          # sum of shards[].samples
      "total_bytes": B,                            # sum of shards[].bytes (index files not counted)
      "rejected": R,                               # lines in rejects.jsonl
      "rejected_by_reason": {"truncated": 3, ...}, # only reasons that occurred
      "created_at": "2026-01-01T00:00:00Z",        # timing fields: the only ones that differ
      "seconds": 1.23                              #   between two runs on the same inputs
    }

`names` are relative to DEST. `total_samples + rejected` equals the number of input files.

`DEST/rejects.jsonl`: one line per rejected input, in input order::

    {"source": "<path as given>", "reason": "<code>", "detail": "<short message>"}

with reason in shards.validate.REASONS: not_an_image, truncated, decompression_bomb,
unreadable, too_small, unsupported.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter

FORMAT_VERSION = 1
TIMING_FIELDS = ("created_at", "seconds")


def file_digest(path: str) -> tuple[int, str]:
    """(bytes, sha256 hex) of a local file, streamed."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def build_manifest(fmt: str, options: dict, shards: list[dict],
                   rejected: list[tuple[str, str, str]], seconds: float) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "format": fmt,
        "created_by": "mocostream",
        "options": options,
        "shards": shards,
        "total_samples": sum(s["samples"] for s in shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(Counter(r for _, r, _ in rejected).items())),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 3),
    }


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode("utf-8")


def rejects_bytes(rejected: list[tuple[str, str, str]]) -> bytes:
    return "".join(json.dumps({"source": s, "reason": r, "detail": d}) + "\n"
                   for s, r, d in rejected).encode("utf-8")
