"""`shards create ... --retry-failed`: top up a finished shard set after a host came back.

Only the rejects a retry can change are retried (downloads that failed on a timeout, a connection or DNS
error, 408/429/5xx; see rejects.can_retry); their rows are found again by key in this part's inputs. What
they give is appended as new shards after the existing ones (deduplicated against everything written),
the rejects they still produce replace theirs, and the manifests are rewritten atomically (manifest.json
last), so written + rejected = inputs still holds. A killed retry leaves the old manifest in place: run
it again.
"""
from __future__ import annotations

import json

from .dedup import Deduper
from .errors import ShardError
from .job import write_set
from .rejects import can_retry, parse as parse_rejects
from .sequence import CreateReport, ShardSequence
from .stats import stats_name


def _shards(job, manifest: dict) -> dict[str, list[dict]]:
    names = manifest.get("formats", {manifest["format"]: "manifest.json"})
    return {f: json.loads(job.dest.read(names[f]) or b'{"shards": []}')["shards"] for f in job.plan.formats}


def _deduper(job, shards: list[dict]) -> Deduper:
    """The dedup index of everything already written, from the shards' stats files."""
    deduper = Deduper(job.plan.dedup, job.plan.dedup_threshold)
    if job.plan.dedup != "none":
        for entry in shards:
            doc = json.loads(job.dest.read(entry.get("stats") or stats_name(entry["name"])) or b"{}")
            for key, _, _, digest in doc.get("written", []):
                deduper.add(digest, key)
    return deduper


def retry_rejects(job, inputs, done: CreateReport | None) -> CreateReport:
    raw = job.dest.read("manifest.json")
    if done is None or raw is None:
        raise ShardError(f"--retry-failed needs a finished run at {job.dest.url}: run the same command "
                         "without --retry-failed first")
    manifest = json.loads(raw)
    old = parse_rejects(job.dest.read("rejects.jsonl"))
    again = {r[3]["key"] for r in old if can_retry(r)}
    if not again:
        return done
    kept = [r for r in old if not (can_retry(r) and r[3]["key"] in again)]
    entries = _shards(job, manifest)
    seq = ShardSequence(job.dest, job.plan, job.fp, job.options, job.extra_fields, entries, 0)
    deduper, fresh = _deduper(job, entries[job.plan.formats[0]]), []
    try:
        stats = job.ingest.run((it for it in inputs if it.key in again), 0, len(again), seq, deduper, fresh)
        if stats.end != len(again):
            raise ShardError(f"{len(again) - stats.end} rejected inputs were not found in the sources again: "
                             "were the sources changed?")
        entries = seq.close(stats.end)
    except BaseException:
        seq.abort()
        raise
    prior = json.loads(job.dest.read("report.json") or b"{}").get("bytes_in", 0)
    return write_set(job, entries, kept + fresh, manifest["inputs"], stats.end, 0, stats, prior + stats.bytes_in)
