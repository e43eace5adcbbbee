"""A shard-set run (Job) and how it ends (write_set), shared by a fresh or resumed run (create.py) and a
`--retry-failed` top-up (retry.py)."""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

from mocostream.pipeline import dali_check

from .ingest import Ingest, PassStats
from .manifest import build_manifest, json_bytes, manifest_names, run_report, write_manifests
from .output import Destination
from .plan import Plan
from .rejects import jsonl_bytes as rejects_jsonl
from .sequence import CreateReport


@dataclass
class Job:
    """What a run needs besides the inputs: its plan, options, fingerprint, destination, one pass runner."""
    plan: Plan
    options: dict
    fp: str
    dest: Destination
    ingest: Ingest
    extra_fields: list | None
    started: float = field(default_factory=time.monotonic)
    cpu_started: float = field(default_factory=time.process_time)


def peak_rss() -> int:
    """This process's peak RSS in bytes. VmHWM where there is /proc: getrusage's ru_maxrss also counts the
    process that spawned us (Linux carries it across the exec of a vfork), e.g. a benchmark holding images."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_set(job: Job, entries: dict[str, list[dict]], rejected: list, inputs: int, processed: int,
              resumed_from: int, stats: PassStats, bytes_in: int, classes: list[str] | None = None) -> CreateReport:
    """rejects.jsonl, report.json and the manifests (manifest.json last: it marks the set complete)."""
    formats, dest = job.plan.formats, job.dest
    seconds = time.monotonic() - job.started
    manifests = {f: build_manifest(f, job.options, entries[f], rejected, seconds, inputs=inputs, formats=formats,
                                   classes=classes) for f in formats}
    manifest = manifests[formats[0]]
    if manifest["total_samples"] + len(rejected) != inputs:  # every input accounted for, always
        raise RuntimeError(f"accounting error: {manifest['total_samples']} written + {len(rejected)} "
                           f"rejected != {inputs} inputs")
    report = run_report(manifest, bytes_in, seconds, processed, resumed_from, job.ingest.pool.n,
                        stats.replaced_workers, dest.location("manifest.json"),
                        {f: m for f, m in manifests.items() if f != formats[0]}, dali_check.checker(),
                        {"main": time.process_time() - job.cpu_started, "workers": stats.worker_cpu})
    report["success_rate"] = round(manifest["total_samples"] / inputs, 4) if inputs else 0.0
    report["http_status"] = dict(sorted(stats.http_status.items()))  # this run's URLs, by final status
    report["peak_rss_bytes"] = peak_rss()  # main process
    dest.write_bytes("rejects.jsonl", rejects_jsonl(rejected))
    dest.write_bytes("report.json", json_bytes(report))
    write_manifests(dest, manifest_names(formats), manifests)  # manifest.json (the primary format's) last
    return CreateReport(shards=entries[formats[0]], written=manifest["total_samples"],
                        rejected=[tuple(r[:3]) for r in rejected], inputs=inputs, seconds=seconds,
                        manifest_url=dest.location("manifest.json"), report=report, resumed_from=resumed_from,
                        by_format=entries)
