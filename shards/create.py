"""create_shards: inputs -> validated, normalised, deduplicated tar/parquet shards + manifest, resumably.

Flow: discover inputs (deterministic order) -> plan (--shuffle order, --part slice, fingerprint) ->
resume from the stats files a killed run with the same fingerprint left -> decode + normalise in
worker processes (workers.py, in input order) -> dedup (in order, so deterministic) -> append to
the current shard -> when full (samples or bytes), finish it (tar: + DALI .idx), publish it atomically,
then its stats file (the checkpoint) -> at the end rejects.jsonl, report.json, then manifest.json last.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from .dedup import Deduper
from .discover import InputFile, discover
from .errors import ShardError
from .manifest import build_manifest, by_reason, file_digest, json_bytes, rejects_bytes, run_report
from .merge import part_dir
from .output import Destination
from .parquet_writer import ParquetShardWriter, extra_schema
from .plan import Plan, differences, fingerprint, input_order, parse_part
from .stats import load_resume, stats_bytes, stats_name
from .tar_writer import TarShardWriter
from .validate import DUPLICATE, MAX_PIXELS, MIN_SIDE, Reject, Sample
from .wds_index import write_index
from .workers import DecodePool

WRITERS = {"tar": TarShardWriter, "parquet": ParquetShardWriter}


@dataclass
class CreateReport:
    shards: list[dict]                                            # as in manifest["shards"]
    written: int
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # (source, reason, detail)
    inputs: int = 0
    seconds: float = 0.0
    manifest_url: str = ""
    report: dict = field(default_factory=dict)                    # as in DEST/report.json
    resumed_from: int = 0                                         # inputs already done by an earlier run
    already_complete: bool = False                                # the destination was finished before

    def rejected_by_reason(self) -> dict[str, int]:
        return by_reason(self.rejected)


def _text(s: str) -> str:
    # Undecodable file names (surrogate escapes) cannot go into JSON/parquet strings as-is.
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class _ShardSequence:
    """Opens shard N lazily, finishes it when full, publishes it + its stats, and keeps the accounting
    of the input range [start, end) each shard covers (its samples and the rejects in between)."""

    def __init__(self, dest: Destination, plan: Plan, fp: str, options: dict, extra_fields, entries: list,
                 position: int):
        self.dest, self.plan, self.fp, self.options, self.extra_fields = dest, plan, fp, options, extra_fields
        self.entries = list(entries)
        self.start = position
        self.written: list[list] = []
        self.rejects: list[list] = []
        self.bytes_in = 0
        self._writer = None
        self._name = ""

    def reject(self, record: tuple, nbytes: int) -> None:
        self.rejects.append(list(record))
        self.bytes_in += nbytes

    def add(self, pos: int, item: InputFile, sample: Sample, nbytes: int) -> None:
        args = (item.key, _text(item.path), _text(item.label), sample, item.extra)
        if (self._writer is not None and self.plan.max_shard_bytes
                and self._writer.bytes + self._writer.cost(*args) > self.plan.max_shard_bytes):
            self.finish(pos)
        if self._writer is None:
            self._name = f"{self.plan.prefix}-{len(self.entries):06d}.{self.plan.format}"
            cls = WRITERS[self.plan.format]
            self._writer = cls(self.dest.staging_path(self._name), self.extra_fields)
        self._writer.add(*args)
        self.written.append([item.key, _text(item.path), len(sample.data), sample.digest])
        self.bytes_in += nbytes
        if self._writer.samples >= self.plan.samples_per_shard:
            self.finish(pos + 1)

    def finish(self, end: int) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        writer.close()
        entry = {"name": self._name, "samples": writer.samples}
        entry["bytes"], entry["sha256"] = file_digest(writer.path)
        if self.plan.format == "tar":
            # Publish the index before its tar: a visible tar always has its .idx next to it.
            idx_name = self._name[: -len(".tar")] + ".idx"
            idx_staged = self.dest.staging_path(idx_name)
            write_index(writer.path, idx_staged, writer.index_lines())
            self.dest.publish(idx_staged, idx_name)
            entry["index"] = idx_name
        entry["stats"] = stats_name(self._name)
        self.dest.publish(writer.path, self._name)
        # The stats file last: it is the checkpoint a rerun trusts.
        self.dest.write_bytes(entry["stats"], stats_bytes(self.fp, self.options, entry, self.start, end,
                                                          self.written, self.rejects, self.bytes_in))
        self.entries.append(entry)
        self.start, self.written, self.rejects, self.bytes_in = end, [], [], 0

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


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
    lines = (dest.read("rejects.jsonl") or b"").decode().splitlines()
    rejected = [(r["source"], r["reason"], r["detail"]) for r in map(json.loads, lines)]
    return CreateReport(shards=m["shards"], written=m["total_samples"], rejected=rejected, inputs=m["inputs"],
                        seconds=time.monotonic() - start, manifest_url=dest.location("manifest.json"),
                        report=json.loads(dest.read("report.json") or b"{}"), resumed_from=m["inputs"],
                        already_complete=True)


def _progress_text(counts: Counter) -> str:
    return f"rejected {sum(counts.values())}" + (" (" + ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
                                                 + ")" if counts else "")


def create_shards(sources: list[str], out: str, fmt: str = "tar", samples_per_shard: int = 1000,
                  prefix: str = "shard", progress: bool = True, *, workers: int = 1, timeout: float = 60.0,
                  min_size: int = MIN_SIDE, max_size: int = 0, quality: int = 95, reencode: str = "auto",
                  dedup: str = "exact", dedup_threshold: int = 4, shuffle: bool = False, seed: int = 0,
                  max_shard_bytes: int = 0, part: str | tuple[int, int] | None = None,
                  max_pixels: int = MAX_PIXELS, memory_limit: int | None = None) -> CreateReport:
    """Turn image sources into validated, normalised shards plus manifest.json at `out`.

    `sources`: folders, tar archives, lists of paths/URLs, parquet tables (shards.discover). `out`: local
    folder or fsspec URL (s3://bucket/prefix; endpoint and keys from the AWS_* environment variables).
    A rerun with the same sources and options continues a killed run (or does nothing if it finished);
    other options into the same `out` raise. Raises ShardError for user errors; bad images never
    raise, they are recorded in rejects.jsonl with a reason code.
    """
    start = time.monotonic()
    plan = Plan(format=fmt, samples_per_shard=samples_per_shard, max_shard_bytes=max_shard_bytes,
                prefix=prefix, min_size=min_size, max_size=max_size, quality=quality, reencode=reencode,
                max_pixels=max_pixels, dedup=dedup, dedup_threshold=dedup_threshold, shuffle=shuffle,
                seed=seed, part=part if isinstance(part, tuple) else parse_part(part))
    plan.check()
    if timeout <= 0:
        raise ShardError(f"--timeout must be positive, got {timeout}")
    inputs = discover(list(sources))
    extra_fields = None
    if fmt == "parquet":
        names = list(dict.fromkeys(k for it in inputs for k in it.extra))
        extra_fields = extra_schema({n: [it.extra.get(n) for it in inputs] for n in names})
    items = [inputs[i] for i in input_order(len(inputs), plan)]
    options = {**plan.as_dict(), "sources": [_text(s) for s in sources]}
    fp = fingerprint(plan, options["sources"], [f"{it.path}\0{it.key}" for it in items])
    options["fingerprint"] = fp

    if plan.part[1] > 1:  # each part in its own folder: hosts never touch each other's files
        out = f"{out.rstrip('/')}/{part_dir(*plan.part)}"
    dest = Destination(out)
    try:
        done = _existing_set(dest, fp, options, start)
    except BaseException:
        dest.close()
        raise
    if done is not None:
        dest.close()
        return done
    dest.remove_stale_temps()
    state = load_resume(dest, prefix, fmt, fp, options)
    deduper = Deduper(plan.dedup, plan.dedup_threshold)
    for key, _, _, digest in state.written:
        deduper.add(digest, key)
    seq = _ShardSequence(dest, plan, fp, options, extra_fields, state.entries, state.position)
    rejected: list[tuple[str, str, str]] = [tuple(r) for r in state.rejects]
    bytes_in = state.bytes_in
    reasons = Counter(r[1] for r in rejected)
    pool = DecodePool(workers, plan.normalise_options(), timeout, memory_limit)
    pool.start()  # before the progress bar's thread
    todo = items[state.position:]
    results = pool.imap(it.locator for it in todo)
    bar = tqdm(total=len(items), initial=state.position, unit="img", desc=f"shards {fmt}",
               disable=not progress, dynamic_ncols=True, mininterval=0.5)
    try:
        for pos, item in enumerate(todo, start=state.position):
            result, nbytes = next(results)
            bytes_in += nbytes
            if isinstance(result, Sample):
                kept = deduper.check(result.digest)
                if kept is not None:
                    result = Reject(DUPLICATE, f"duplicate of {kept}")
            if isinstance(result, Reject):
                record = (_text(item.path), result.reason, result.detail)
                rejected.append(record)
                seq.reject(record, nbytes)
                reasons[result.reason] += 1
                bar.set_postfix_str(_progress_text(reasons), refresh=False)
            else:
                deduper.add(result.digest, item.key)
                seq.add(pos, item, result, nbytes)
            bar.update()
        seq.finish(len(items))
        results.close()
        seconds = time.monotonic() - start
        manifest = build_manifest(fmt, options, seq.entries, rejected, seconds, inputs=len(items))
        if manifest["total_samples"] + len(rejected) != len(items):  # every input accounted for, always
            raise RuntimeError(f"accounting error: {manifest['total_samples']} written + {len(rejected)} "
                               f"rejected != {len(items)} inputs")
        report = run_report(manifest, bytes_in, seconds, len(todo), state.position, workers, pool.replaced,
                            dest.location("manifest.json"))
        dest.write_bytes("rejects.jsonl", rejects_bytes(rejected))
        dest.write_bytes("report.json", json_bytes(report))
        dest.write_bytes("manifest.json", json_bytes(manifest))  # last: marks the set complete
    except BaseException:
        seq.abort()
        raise
    finally:
        results.close()
        pool.close()
        bar.close()
        dest.close()
    return CreateReport(shards=seq.entries, written=manifest["total_samples"], rejected=rejected,
                        inputs=len(items), seconds=time.monotonic() - start,
                        manifest_url=dest.location("manifest.json"), report=report,
                        resumed_from=state.position)
