"""`shards create ... --retry-failed`: top up a finished shard set after a host came back.

Only the rejects a retry can change are retried (downloads that failed on a timeout, a connection or DNS
error, 408/429/5xx; see rejects.can_retry); their rows are found again by key in this part's inputs. What
they give is appended as new shards after the existing ones (deduplicated against everything written),
the rejects they still produce replace theirs, and the manifests are rewritten atomically (manifest.json
last), so written + rejected = inputs still holds. Before anything is fetched or written the set is
checked (shards.consistency): a hand-edited manifest or a missing shard is refused, never overwritten.
A killed retry leaves the old manifest in place: run it again (its unlisted shards are replaced).
"""
from __future__ import annotations

import json

from .consistency import manifest_digest, problems
from .dedup import Deduper
from .errors import ShardError
from .job import write_set
from .rejects import can_retry, parse as parse_rejects
from .sequence import CreateReport, ShardSequence


def _manifests(job, manifest: dict) -> dict[str, dict]:
    names = manifest.get("formats", {manifest["format"]: "manifest.json"})
    out = {}
    for f in job.plan.formats:
        raw = manifest if names.get(f) == "manifest.json" else job.dest.read(names.get(f, f"manifest-{f}.json"))
        if raw is None:
            raise ShardError(f"{job.dest.location(names.get(f, f'manifest-{f}.json'))} is missing: the set is "
                             "not whole; nothing was retried")
        out[f] = raw if isinstance(raw, dict) else json.loads(raw)
    return out


def _checked(job, raw: bytes, manifests: dict[str, dict]) -> Deduper:
    """The dedup index of everything already written (from the stats files), once the set is found whole."""
    deduper = Deduper(job.plan.dedup, job.plan.dedup_threshold)

    def add(doc):
        if job.plan.dedup != "none":
            for key, _, _, digest in doc.get("written", []):
                deduper.add(digest, key)

    found = problems(job.dest, manifests, raw, add)
    if found:
        more = f" (and {len(found) - 1} more problem(s))" if len(found) > 1 else ""
        raise ShardError(f"{job.dest.url} is not a whole shard set, nothing was retried: {found[0]}{more}; "
                         "restore it or create the set again in a new destination")
    return deduper


def _rejects(job, manifest: dict, done: CreateReport) -> list[list] | None:
    """rejects.jsonl's records; None (with a warning on `done`) when they do not match the manifest's count
    and none of them can be retried."""
    old = parse_rejects(job.dest.read("rejects.jsonl"), job.dest.location("rejects.jsonl"))
    if len(old) == manifest["rejected"]:
        return old
    lost = (f"{job.dest.location('rejects.jsonl')} lists {len(old)} reject(s) but manifest.json counts "
            f"{manifest['rejected']}")
    if not any(can_retry(r) for r in old):
        done.warnings.append(f"{lost}: nothing to retry (the missing lines cannot be found again)")
        return None
    raise ShardError(f"{lost}: retrying would break the set's accounting; restore rejects.jsonl")


def retry_rejects(job, inputs, done: CreateReport | None) -> CreateReport:
    raw = job.dest.read("manifest.json")
    if done is None or raw is None:
        raise ShardError(f"--retry-failed needs a finished run at {job.dest.url}: run the same command "
                         "without --retry-failed first")
    manifest = json.loads(raw)
    old = _rejects(job, manifest, done)
    again = {r[3]["key"] for r in old or [] if can_retry(r)}
    if not again:
        return done
    manifests = _manifests(job, manifest)
    deduper = _checked(job, raw, manifests)
    kept = [r for r in old if not (can_retry(r) and r[3]["key"] in again)]
    entries = {f: m["shards"] for f, m in manifests.items()}
    seq = ShardSequence(job.dest, job.plan, job.fp, job.options, job.extra_fields, entries, 0,
                        appended_to=manifest_digest(raw))
    fresh = []
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
