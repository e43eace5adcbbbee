"""create_shards: inputs -> validated, normalised, deduplicated tar/parquet shards + manifest, resumably.

Flow: stream this part's inputs (discover.Inputs: --shuffle order, --part slice) -> fingerprint -> resume
from the stats files a killed run with the same fingerprint left -> one pass (ingest.py: download http(s)
URLs many at a time, decode in worker processes, back in input order, dedup) into the shard sequence
(sequence.py: each full shard published atomically, then its stats file, the checkpoint) -> at the end
(job.write_set) rejects.jsonl, report.json, the other formats' manifests, manifest.json last.
`--retry-failed` (retry.py) reruns only the retryable rejects of a finished set and appends shards.
"""
from __future__ import annotations

import json
import time

from mocostream.pipeline import dali_check
from mocostream.pipeline.filesystems import Storage
from mocostream.pipeline.image_check import validation_stamp

from .addresses import parse_networks
from .dedup import Deduper
from .discover import Inputs
from .download import HttpOptions
from .errors import ShardError
from .ingest import Ingest
from .job import Job, write_set
from .keys import json_safe, without_credentials
from .lock import DestLock
from .merge import part_dir
from .metrics import IngestMetrics
from .output import Destination
from .plan import Plan, differences, fingerprint, parse_formats, parse_part
from .rejects import parse as parse_rejects
from .sequence import CreateReport, ShardSequence
from .stats import load_resume
from .tables import Columns
from .validate import REASONS
from .workers import DecodePool


def _existing_set(dest: Destination, fp: str, options: dict, start: float) -> CreateReport | None:
    """The report of an already complete destination made with the same fingerprint; None when there
    is no manifest; ShardError when its manifest was made with other options or inputs."""
    raw = dest.read("manifest.json")
    if raw is None:
        return None
    m = json.loads(raw)
    if m.get("options", {}).get("fingerprint") != fp:
        raise ShardError(f"destination already holds a shard set made with other options or inputs "
                         f"({differences(m.get('options', {}), options)}): {dest.location('manifest.json')}; "
                         "use another destination or remove it first")
    rejected = [tuple(r[:3]) for r in parse_rejects(dest.read("rejects.jsonl"), dest.location("rejects.jsonl"))]
    by_format = {f: json.loads(dest.read(name) or b'{"shards": []}')["shards"]
                 for f, name in m.get("formats", {m.get("format"): "manifest.json"}).items()}
    return CreateReport(shards=m["shards"], written=m["total_samples"], rejected=rejected, inputs=m["inputs"],
                        seconds=time.monotonic() - start, manifest_url=dest.location("manifest.json"),
                        report=json.loads(dest.read("report.json") or b"{}"), resumed_from=m["inputs"],
                        already_complete=True, by_format=by_format)


def _fresh_or_resumed(job: Job, inputs: Inputs) -> CreateReport:
    plan, dest = job.plan, job.dest
    dest.remove_stale_temps()
    state = load_resume(dest, plan.prefix, plan.formats, job.fp, job.options)
    deduper = Deduper(plan.dedup, plan.dedup_threshold)
    for key, _, _, digest in state.written:
        deduper.add(digest, key)
    seq = ShardSequence(dest, plan, job.fp, job.options, job.extra_fields, state.entries, state.position,
                        state.labels)
    rejected = [list(r) for r in state.rejects]
    items = iter(inputs)
    for _ in range(state.position):  # a resumed run skips what the checkpoints account for
        next(items)
    try:
        stats = job.ingest.run(items, state.position, None, seq, deduper, rejected)
        done = stats.end
        entries = seq.close(done)
    except BaseException:
        seq.abort()
        raise
    return write_set(job, entries, rejected, done, done - state.position, state.position, stats,
                     state.bytes_in + stats.bytes_in, None if seq.labels is None else sorted(seq.labels))


def make_plan(options: dict, http: HttpOptions) -> Plan:
    """The checked Plan from its fields' values (`part` may be "i/N" text, `format` "tar, parquet")."""
    part = options.get("part")
    plan = Plan(**{**options, "format": ",".join(parse_formats(options.get("format", "tar"))),
                   "part": part if isinstance(part, tuple) else parse_part(part),
                   "respect_opt_out": http.respect_opt_out, "max_download_bytes": http.max_bytes})
    plan.check()
    return plan


def check_http(http: HttpOptions) -> None:
    for name, value, low in (("--io-concurrency", http.concurrency, 1), ("--per-host-connections", http.per_host, 1),
                             ("--retries", http.retries, 0), ("--max-redirects", http.max_redirects, 0)):
        if value < low:
            raise ShardError(f"{name} must be at least {low}, got {value}")
    if http.timeout <= 0:
        raise ShardError(f"--http-timeout must be positive, got {http.timeout}")
    try:
        parse_networks(http.allow_networks)
    except ValueError as exc:
        raise ShardError(f"--allow-networks: {exc}") from exc


def create_shards(sources: list[str], out: str, *, progress: bool = True, workers: int = 1, timeout: float = 60.0,
                  memory_limit: int | None = None, http: HttpOptions | None = None, retry_failed: bool = False,
                  metrics_port: int | None = None, fmt: str | None = None, storage: Storage | None = None,
                  **plan_options) -> CreateReport:
    """Turn image sources into validated, normalised shards plus manifest.json at `out`.

    `sources`: folders, tar archives, tables of paths/URLs, parquet tables (shards.discover). `out`: local
    folder or fsspec URL (s3://bucket/prefix; endpoint and keys from the AWS_* environment variables).
    `plan_options`: the fields of shards.plan.Plan, the options that shape the output (`fmt` is `format`:
    "tar", "parquet", or both, "tar,parquet": the same samples in each; see shards.manifest).
    `http`: the download stage's options (shards.download.HttpOptions). `storage`: how remote sources are read and
    `out` is written (pipeline.filesystems: timeouts, retries; default: the default settings). A rerun with the same sources and
    options continues a killed run (or does nothing if it finished); other options into the same `out`
    raise; `retry_failed` on a finished `out` retries its retryable rejects. Raises ShardError for user
    errors; bad images never raise, they are recorded in rejects.jsonl with a reason code.
    """
    http = http or HttpOptions()
    plan = make_plan(plan_options if fmt is None else {**plan_options, "format": fmt}, http)
    if timeout <= 0:
        raise ShardError(f"--timeout must be positive, got {timeout}")
    check_http(http)
    cols = Columns(plan.url_col or None, plan.caption_col or None,
                   tuple(c.strip() for c in plan.extra_cols.split(",") if c.strip()) if plan.extra_cols else None)
    storage = storage or Storage()
    inputs = Inputs(list(sources), plan.part, cols, plan.shuffle, plan.seed, storage=storage)
    options = {**plan.as_dict(), "sources": [json_safe(without_credentials(s)) for s in sources]}
    options["fingerprint"] = fp = fingerprint(plan, options["sources"], inputs.identity())
    options["validated_by"] = validation_stamp(plan.max_pixels)  # lets the loader skip its pre-flight check
    options["source_ids"] = inputs.content_ids()  # what each source held: `shards merge` compares the parts'
    if plan.part[1] > 1:  # each part in its own folder: hosts never touch each other's files
        out = f"{out.rstrip('/')}/{part_dir(*plan.part)}"
    dest = Destination(out, storage=storage)
    lock = DestLock(dest)
    try:
        lock.acquire()  # before anything is read or written: one run per destination
        done = _existing_set(dest, fp, options, time.monotonic())
        if done is not None and not retry_failed:
            return done
        dali_check.checker()  # loads DALI's decoder library once, before the workers fork
        pool = DecodePool(workers, plan.normalise_options(), timeout, memory_limit, tar="tar" in plan.formats,
                          storage=storage)
        ingest = Ingest(pool, http if inputs.table_sources() else None,
                        IngestMetrics(plan.part[0], REASONS), metrics_port, progress, f"shards {plan.format}")
        job = Job(plan, options, fp, dest, ingest, inputs.extra_types() if "parquet" in plan.formats else None)
        if retry_failed:
            from .retry import retry_rejects
            return retry_rejects(job, inputs, done)
        return _fresh_or_resumed(job, inputs)
    finally:
        lock.release()
        dest.close()
