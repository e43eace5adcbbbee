"""Per-shard stats files: the accounting of each shard, and the checkpoints a rerun resumes from.

`DEST/<prefix>-NNNNNN_stats.json` is published right after its shard (so its presence means the shard
is complete) and holds::

    {"fingerprint": "<sha256 of options + inputs>",     # shards.plan.fingerprint
     "options": {...},                                   # as in the manifest
     "shard": {<the manifest entry: name, samples, bytes, sha256[, index]>},
     "also": [{<entry>}, ...],        # only with several formats: the same samples in the other formats
     "inputs": [start, end],          # positions in the processing order this shard accounts for
     "written": [[key, source, bytes_out, digest], ...],
     "rejects": [[source, reason, detail], ...],        # inputs in [start, end) left out, in order
     "rejected_by_reason": {...}, "bytes_in": B, "bytes_out": B,
     "appended_to": "<sha256>"}       # only a --retry-failed shard: the manifest.json it was appended to

written + rejects = end - start. A rerun reads them in order, checks the shard (in every format) is there
with its size, and continues at `end` of the last good one with the dedup index rebuilt from `written`.
With several formats, shard N of each holds the same samples, so one stats file accounts for all of them.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from .errors import ShardError
from .output import Destination
from .plan import differences


def stats_name(shard_name: str) -> str:
    return shard_name.rsplit(".", 1)[0] + "_stats.json"


def stats_bytes(fingerprint: str, options: dict, entries: list[dict], start: int, end: int, written: list,
                rejects: list, bytes_in: int, labels: list[str] | None = None, appended_to: str = "") -> bytes:
    """`entries`: the shard's manifest entry in each format, the primary format first."""
    doc = {"fingerprint": fingerprint, "options": options, "shard": entries[0]}
    if len(entries) > 1:
        doc["also"] = entries[1:]
    doc.update({"inputs": [start, end], "written": written, "rejects": rejects,
                "rejected_by_reason": dict(sorted(Counter(r[1] for r in rejects).items())),
                "bytes_in": bytes_in, "bytes_out": entries[0]["bytes"], "labels": labels or []})
    if appended_to:
        doc["appended_to"] = appended_to
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


@dataclass
class ResumeState:
    entries: dict[str, list[dict]] = field(default_factory=dict)  # format -> manifest entries of complete shards
    position: int = 0                                      # next input position to process
    written: list[list] = field(default_factory=list)      # [key, source, bytes_out, digest] so far
    rejects: list[list] = field(default_factory=list)      # [source, reason, detail] so far
    bytes_in: int = 0
    labels: set | None = field(default_factory=set)        # distinct labels so far; None: a checkpoint lacks them


def load_resume(dest: Destination, prefix: str, formats: tuple[str, ...], fingerprint: str,
                options: dict) -> ResumeState:
    """The complete shards an earlier run with the same fingerprint left at `dest`."""
    state = ResumeState(entries={f: [] for f in formats})
    n = 0
    while True:
        name = f"{prefix}-{n:06d}.{formats[0]}"
        raw = dest.read(stats_name(name))
        if raw is None:
            return state
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError:
            return state  # cannot happen with atomic publishing, but never trust it
        if doc.get("fingerprint") != fingerprint:
            raise ShardError(f"{dest.location(stats_name(name))} was made with different options or inputs "
                             f"({differences(doc.get('options', {}), options)}); use another destination or "
                             "remove it first")
        entries = [doc["shard"]] + doc.get("also", [])
        if [e["name"].rsplit(".", 1)[1] for e in entries] != list(formats):
            return state
        for entry in entries:
            if dest.size(entry["name"]) != entry["bytes"] or (entry.get("index") and dest.size(entry["index"]) is None):
                return state  # shard missing or replaced: redo it and everything after it
        start, end = doc["inputs"]
        if start != state.position:
            return state
        for fmt, entry in zip(formats, entries):
            state.entries[fmt].append(entry)
        state.written.extend(doc["written"])
        state.rejects.extend(doc["rejects"])
        state.bytes_in += doc["bytes_in"]
        if state.labels is not None:
            state.labels = state.labels | set(doc["labels"]) if "labels" in doc else None
        state.position = end
        n += 1
