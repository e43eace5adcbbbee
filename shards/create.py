"""create_shards: inputs -> validated, normalised, deduplicated tar/parquet shards + manifest, resumably.

Flow: discover inputs (deterministic order) -> plan (--shuffle order, --part slice, fingerprint) ->
resume from the stats files a killed run with the same fingerprint left -> decode, normalise and render
in worker processes (workers.py, in input order) -> dedup (in order, so deterministic) -> append to
the current shard (in every output format) -> when full (samples or bytes), finish it (tar: + DALI .idx),
publish it atomically, then its stats file (the checkpoint) -> at the end rejects.jsonl, report.json,
the manifests of the other formats, then manifest.json last.
"""
from __future__ import annotations

import json
import resource
import time
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from pipeline import dali_check
from pipeline.image_check import validation_stamp

from .dedup import Deduper
from .discover import InputFile, discover
from .errors import ShardError
from .manifest import (build_manifest, by_reason, json_bytes, manifest_names, rejects_bytes, run_report,
                       write_manifests)
from .merge import part_dir
from .output import Destination
from .parquet_writer import ParquetShardWriter, extra_schema
from .plan import Plan, differences, fingerprint, input_order, parse_formats, parse_part
from .background import InOrder
from .record import Record
from .stats import load_resume, stats_bytes, stats_name
from .tar_writer import TarShardWriter
from .validate import DUPLICATE, MAX_PIXELS, MIN_SIDE, Reject
from .wds_index import write_index
from .workers import DecodePool

WRITERS = {"tar": TarShardWriter, "parquet": ParquetShardWriter}


@dataclass
class CreateReport:
    shards: list[dict]                                            # as in manifest["shards"] (primary format)
    written: int
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # (source, reason, detail)
    inputs: int = 0
    seconds: float = 0.0
    manifest_url: str = ""
    report: dict = field(default_factory=dict)                    # as in DEST/report.json
    resumed_from: int = 0                                         # inputs already done by an earlier run
    already_complete: bool = False                                # the destination was finished before
    by_format: dict[str, list[dict]] = field(default_factory=dict)  # every format's shards (shards = the first's)

    def rejected_by_reason(self) -> dict[str, int]:
        return by_reason(self.rejected)


def _text(s: str) -> str:
    # Undecodable file names (surrogate escapes) cannot go into JSON/parquet strings as-is.
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class _ShardSequence:
    """Opens shard N lazily (one writer per output format), hands it to the publisher thread when full,
    and keeps the accounting of the input range [start, end) each shard covers (its samples and the
    rejects in between). Every format's shard N holds the same samples: a shard ends when any of its
    formats reaches a limit."""

    def __init__(self, dest: Destination, plan: Plan, fp: str, options: dict, extra_fields,
                 entries: dict[str, list[dict]], position: int):
        self.dest, self.plan, self.fp, self.options, self.extra_fields = dest, plan, fp, options, extra_fields
        self.formats = plan.formats
        self.entries = {f: list(entries.get(f, [])) for f in self.formats}  # published shards, in order
        self.count = len(self.entries[self.formats[0]])                      # shards started
        self.start = position
        self.written: list[list] = []
        self.rejects: list[list] = []
        self.bytes_in = 0
        self._writers: list = []  # (format, name, writer) of the open shard
        self._limit = plan.max_shard_bytes
        self._publisher = InOrder()

    def reject(self, record: tuple, nbytes: int) -> None:
        self.rejects.append(list(record))
        self.bytes_in += nbytes

    def add(self, pos: int, item: InputFile, source: str, label: str, record: Record, nbytes: int) -> None:
        if self._writers and self._limit and any(w.bytes + w.cost(item.key, source, record) > self._limit
                                                 for _, _, w in self._writers):
            self.finish(pos)
        if not self._writers:
            for fmt in self.formats:
                name = f"{self.plan.prefix}-{self.count:06d}.{fmt}"
                self._writers.append((fmt, name, WRITERS[fmt](self.dest.staging_path(name), self.extra_fields)))
            self.count += 1
        for _, _, w in self._writers:
            w.add(item.key, source, label, record, item.extra)
        self.written.append([item.key, source, record.size, record.digest])
        self.bytes_in += nbytes
        if self._writers[0][2].samples >= self.plan.samples_per_shard:
            self.finish(pos + 1)

    def finish(self, end: int) -> None:
        """Hand the open shard to the publisher thread; the next one can start at once."""
        if self._writers:
            self._publisher.submit(self._publish, self._writers, self.start, end, self.written, self.rejects,
                                   self.bytes_in)
        self._writers = []
        self.start, self.written, self.rejects, self.bytes_in = end, [], [], 0

    def _publish(self, writers: list, start: int, end: int, written: list, rejects: list, bytes_in: int) -> None:
        entries = []
        for fmt, name, writer in writers:
            writer.close()
            entry = {"name": name, "samples": writer.samples}
            entry["bytes"], entry["sha256"] = writer.digest()
            if fmt == "tar":
                # Publish the index before its tar: a visible tar always has its .idx next to it.
                idx_name = name[: -len(".tar")] + ".idx"
                idx_staged = self.dest.staging_path(idx_name)
                write_index(writer.path, idx_staged, writer.index_lines())
                self.dest.publish(idx_staged, idx_name)
                entry["index"] = idx_name
            entry["stats"] = stats_name(name)  # the same file for every format: shard N holds the same samples
            self.dest.publish(writer.path, name)
            entries.append(entry)
        # The stats file last: it is the checkpoint a rerun trusts.
        self.dest.write_bytes(entries[0]["stats"], stats_bytes(self.fp, self.options, entries, start, end,
                                                               written, rejects, bytes_in))
        for fmt, entry in zip(self.formats, entries):
            self.entries[fmt].append(entry)

    def close(self, end: int) -> dict[str, list[dict]]:
        """Finish the last shard and wait until every shard is published; the entries per format."""
        self.finish(end)
        self._publisher.drain()
        self._publisher.close()
        return self.entries

    def abort(self) -> None:
        for _, _, w in self._writers:
            w.abort()
        self._writers = []
        self._publisher.close()  # shards already handed over are complete: let them land


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
    by_format = {f: json.loads(dest.read(name) or b'{"shards": []}')["shards"]
                 for f, name in m.get("formats", {m.get("format"): "manifest.json"}).items()}
    return CreateReport(shards=m["shards"], written=m["total_samples"], rejected=rejected, inputs=m["inputs"],
                        seconds=time.monotonic() - start, manifest_url=dest.location("manifest.json"),
                        report=json.loads(dest.read("report.json") or b"{}"), resumed_from=m["inputs"],
                        already_complete=True, by_format=by_format)


def _progress_text(counts: Counter) -> str:
    return f"rejected {sum(counts.values())}" + (" (" + ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
                                                 + ")" if counts else "")


def _children_cpu() -> float:
    # Workers forked by this process count here once joined (forkserver-started ones do not).
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _tasks(items: list[InputFile]):
    # What a worker needs to fetch, decode and render one input (texts made JSON/parquet-safe here).
    for it in items:
        yield it.locator, (it.key, _text(it.path), _text(it.label), it.extra)


def create_shards(sources: list[str], out: str, fmt: str = "tar", samples_per_shard: int = 1000,
                  prefix: str = "shard", progress: bool = True, *, workers: int = 1, timeout: float = 60.0,
                  min_size: int = MIN_SIDE, max_size: int = 0, quality: int = 95, reencode: str = "auto",
                  dedup: str = "exact", dedup_threshold: int = 4, shuffle: bool = False, seed: int = 0,
                  max_shard_bytes: int = 0, part: str | tuple[int, int] | None = None,
                  max_pixels: int = MAX_PIXELS, memory_limit: int | None = None) -> CreateReport:
    """Turn image sources into validated, normalised shards plus manifest.json at `out`.

    `sources`: folders, tar archives, lists of paths/URLs, parquet tables (shards.discover). `out`: local
    folder or fsspec URL (s3://bucket/prefix; endpoint and keys from the AWS_* environment variables).
    `fmt`: "tar", "parquet", or both ("tar,parquet": the same samples in each; see shards.manifest).
    A rerun with the same sources and options continues a killed run (or does nothing if it finished);
    other options into the same `out` raise. Raises ShardError for user errors; bad images never
    raise, they are recorded in rejects.jsonl with a reason code.
    """
    start, cpu_start = time.monotonic(), time.process_time()
    formats = parse_formats(fmt)
    plan = Plan(format=",".join(formats), samples_per_shard=samples_per_shard, max_shard_bytes=max_shard_bytes,
                prefix=prefix, min_size=min_size, max_size=max_size, quality=quality, reencode=reencode,
                max_pixels=max_pixels, dedup=dedup, dedup_threshold=dedup_threshold, shuffle=shuffle,
                seed=seed, part=part if isinstance(part, tuple) else parse_part(part))
    plan.check()
    if timeout <= 0:
        raise ShardError(f"--timeout must be positive, got {timeout}")
    inputs = discover(list(sources))
    extra_fields = None
    if "parquet" in formats:
        names = list(dict.fromkeys(k for it in inputs for k in it.extra))
        extra_fields = extra_schema({n: [it.extra.get(n) for it in inputs] for n in names})
    items = [inputs[i] for i in input_order(len(inputs), plan)]
    options = {**plan.as_dict(), "sources": [_text(s) for s in sources]}
    fp = fingerprint(plan, options["sources"], [f"{it.path}\0{it.key}" for it in items])
    options["fingerprint"] = fp
    options["validated_by"] = validation_stamp(plan.max_pixels)  # lets the loader skip its pre-flight check

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
    state = load_resume(dest, prefix, formats, fp, options)
    deduper = Deduper(plan.dedup, plan.dedup_threshold)
    for key, _, _, digest in state.written:
        deduper.add(digest, key)
    seq = _ShardSequence(dest, plan, fp, options, extra_fields, state.entries, state.position)
    rejected: list[tuple[str, str, str]] = [tuple(r) for r in state.rejects]
    bytes_in = state.bytes_in
    reasons = Counter(r[1] for r in rejected)
    checker = dali_check.checker()  # loads DALI's decoder library once, before the workers fork
    children_cpu = _children_cpu()
    pool = DecodePool(workers, plan.normalise_options(), timeout, memory_limit, tar="tar" in formats)
    pool.start()  # before the progress bar's thread
    todo = items[state.position:]
    tasks = _tasks(todo)
    results = pool.imap(tasks)
    bar = tqdm(total=len(items), initial=state.position, unit="img", desc=f"shards {plan.format}",
               disable=not progress, dynamic_ncols=True, mininterval=0.5)
    try:
        for pos, item in enumerate(todo, start=state.position):
            result, nbytes = next(results)
            bytes_in += nbytes
            if isinstance(result, Record):
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
                seq.add(pos, item, _text(item.path), _text(item.label), result, nbytes)
            bar.update()
        seq.close(len(items))
        results.close()
        seconds = time.monotonic() - start
        names = manifest_names(formats)
        manifests = {f: build_manifest(f, options, seq.entries[f], rejected, seconds, inputs=len(items),
                                       formats=formats) for f in formats}
        manifest = manifests[formats[0]]
        if manifest["total_samples"] + len(rejected) != len(items):  # every input accounted for, always
            raise RuntimeError(f"accounting error: {manifest['total_samples']} written + {len(rejected)} "
                               f"rejected != {len(items)} inputs")
        report = run_report(manifest, bytes_in, seconds, len(todo), state.position, workers, pool.replaced,
                            dest.location("manifest.json"), {f: m for f, m in manifests.items() if f != formats[0]},
                            checker, {"main": time.process_time() - cpu_start,
                                      "workers": _children_cpu() - children_cpu})
        dest.write_bytes("rejects.jsonl", rejects_bytes(rejected))
        dest.write_bytes("report.json", json_bytes(report))
        write_manifests(dest, names, manifests)  # manifest.json (the primary format's) last: marks the set complete
    except BaseException:
        seq.abort()
        raise
    finally:
        results.close()
        pool.close()
        bar.close()
        dest.close()
    return CreateReport(shards=seq.entries[formats[0]], written=manifest["total_samples"], rejected=rejected,
                        inputs=len(items), seconds=time.monotonic() - start,
                        manifest_url=dest.location("manifest.json"), report=report,
                        resumed_from=state.position, by_format=seq.entries)
