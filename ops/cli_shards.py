"""`mocostream shards ...`: CLI glue around shards/ (create, verify, inspect, merge); no logic of its own."""
from __future__ import annotations

import argparse
import functools
import json
import sys

from mocostream.shards import REASONS, CreateReport, ShardError, create_shards
from mocostream.shards.download import HttpOptions, user_agent
from mocostream.shards.options import byte_size
from mocostream.shards.plan import Plan

from .cpu_budget import detect_budget, shard_tool_defaults
from .options import add_options, values_from
from .storage_flags import add_storage_flags, storage_from_args

HTTP = "http_"  # argparse destinations of the download options: --timeout is the decode workers'


@functools.cache
def budget_defaults() -> tuple[int, int]:
    """(decode workers, downloads in flight) from the CPUs this process may use (one process per pod)."""
    return shard_tool_defaults(detect_budget(local_ranks=1))


CREATE_HELP = f"""\
Read every input, decode it fully (in worker processes with a per-file time and pixel budget), normalise
it and pack the good images into shards at DEST. Each input is either written or rejected with a reason:
  {', '.join(REASONS)}.
Rejected inputs are listed in DEST/rejects.jsonl and do not make the exit status non-zero.

SRC can be, mixed in one run:
  a folder              walked recursively in sorted order; the label is the parent folder's name
  a tar archive         .tar / .tar.gz / .tgz of images (members in archive order)
  a table of inputs     .txt / .lst / .urls: one path or URL per line (s3://, http(s)://, any fsspec URL);
                        .csv / .tsv (header line), .jsonl, .parquet: a URL column (url, URL, image_url,
                        path or --url-col), a caption (caption, TEXT, text or --caption-col) and extra
                        columns (all, or --extra-cols); text tables may be .gz/.bz2/.xz compressed.
                        LAION / DataComp / CC12M tables work as they are. Tables are streamed, and
                        --part i/N reads only its slice (a byte range, or parquet row groups).
  a parquet table       with an `image` bytes column
Extra fields (caption, label, ...) travel into each sample's JSON (tar) or columns (parquet).

http(s) URLs are downloaded by the main process, --io-concurrency at a time; each host gets as many
connections as it handles well (from 4, up to --per-host-connections; fewer after 429/503/timeouts, paused
for its Retry-After), with timeouts, retries (backoff, Retry-After) and the User-Agent
"{user_agent('TOKEN')}"; the decode workers get the bytes. Loopback, private, link-local and
other non-public addresses are refused (blocked_address), after redirects too, unless
--allow-private-addresses. Images whose response says X-Robots-Tag noai / noimageai / noindex /
noimageindex are not written (opted_out).
rejects.jsonl gives each failed URL's status and attempts; --retry-failed retries the retryable ones.

Normalisation: EXIF orientation applied; CMYK, palette, 16-bit, greyscale -> RGB; alpha on white; first
frame of animations. Upright RGB JPEG/PNG/WebP are kept byte-for-byte (--reencode auto); anything that
needed a change, or that DALI cannot decode, is stored as JPEG at --quality.

Bytes kept as they are must also decode with DALI's own decoder (nvImageCodec, CPU), which is stricter
than PIL on headers; files only PIL reads are re-encoded (or, with --reencode never, rejected).

Outputs: P-NNNNNN.tar (+ DALI .idx) and/or .parquet, P-NNNNNN_stats.json per shard, rejects.jsonl,
report.json, and manifest.json (shard names, sample counts, bytes, sha256) written last. With
--format tar,parquet, manifest.json describes the tars and manifest-parquet.json the parquet files
(same samples, keys and order): `mocostream train --data DEST` reads the first format listed.
Rerunning the same command continues a run that was killed (even with kill -9) and ends with the same
bytes as an uninterrupted run; rerunning a finished one does nothing; other options into the same DEST
are refused."""


def add_shards_parser(subparsers) -> None:
    """Register `shards create|verify|inspect|merge` on the main CLI's subparsers."""
    shards = subparsers.add_parser(
        "shards", help="create, verify, inspect and merge training shards",
        description="Create and manage training shards (webdataset tar or parquet).")
    sub = shards.add_subparsers(dest="shards_command", metavar="COMMAND", required=True)
    add_create_parser(sub)
    add_verify_parser(sub)
    add_inspect_parser(sub)
    add_merge_parser(sub)


def add_create_parser(sub) -> None:
    """`shards create`: the options that shape the output are shards.plan.Plan's fields, the download
    options shards.download.HttpOptions' (both define their flags once); the rest say how to run."""
    c = sub.add_parser(
        "create", help="validate, normalise, deduplicate and pack images into shards",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=CREATE_HELP,
        epilog=("examples:\n"
                "  mocostream shards create data/train --out s3://bucket/imagenet/train --samples-per-shard 2000\n"
                "  mocostream shards create urls.txt photos.tar --out shards/ --max-size 512 --shuffle --seed 1\n"
                "  mocostream shards create urls.txt --out s3://b/web --part 3/8   # on host 3 of 8; then:\n"
                "  mocostream shards merge s3://b/web\n\n"
                "For s3:// the endpoint and keys come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY; --storage-timeout and --storage-retries apply to remote sources (tables and "
                "the s3:// entries they list) and to DEST, as in train."))
    c.add_argument("sources", nargs="+", metavar="SRC",
                   help="folder, tar archive, list of paths/URLs (.txt/.jsonl) or parquet table")
    c.add_argument("--out", required=True, metavar="DEST",
                   help="destination: a local folder (created if missing) or s3://bucket/prefix")
    add_options(c, Plan)
    add_options(c, HttpOptions, prefix=HTTP)
    workers, downloads = budget_defaults()
    c.set_defaults(**{HTTP + "concurrency": downloads})  # 32 per CPU of the budget, 32 to 256
    c.add_argument("--workers", type=int, default=workers, metavar="N",
                   help="decode processes (default: the CPU budget, the smallest of the affinity mask and the "
                        "cgroup CPU quota: %(default)s); 0 decodes in-process")
    c.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="per-file time budget; a decoder over it is killed and the file rejected as "
                        "timeout (default: %(default)s)")
    c.add_argument("--worker-memory", type=byte_size, default=None, metavar="SIZE",
                   help="memory a decode worker may allocate (e.g. 2GiB); a file needing more is rejected as "
                        "decompression_bomb (default: 16 bytes per --max-pixels pixel + 512 MiB; 0 = no cap)")
    c.add_argument("--retry-failed", action="store_true",
                   help="on a finished DEST: retry only the retryable rejects (timeouts, connection and DNS "
                        "errors, 408/429/5xx) and append what they give as new shards")
    c.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics (inputs by result, HTTP codes, bytes, latency, in flight, "
                        "connections and back-offs per host) on this port while running")
    c.add_argument("--quiet", action="store_true", help="no progress bar (the summary is still printed)")
    c.add_argument("--json", action="store_true",
                   help="print the run report (as in DEST/report.json) as one JSON line instead of the summary")
    add_storage_flags(c)
    c.set_defaults(func=run_shards_create)


def add_verify_parser(sub) -> None:
    v = sub.add_parser("verify", help="check every shard against the manifest; exit 1 on a mismatch",
                       description="Check every shard listed in DEST/manifest.json: present, byte size, sha256, "
                                   "sample count, every sample decodable (PIL, end to end), DALI index. "
                                   "Exit status 0 when all is well, 1 when anything is wrong.")
    v.add_argument("dest", metavar="DEST", help="folder or s3:// prefix holding manifest.json")
    v.add_argument("--no-decode", action="store_true", help="skip decoding the samples (size/hash/count only)")
    v.add_argument("--quiet", action="store_true", help="print only problems and the final line")
    add_storage_flags(v)
    v.set_defaults(func=run_shards_verify)


def add_inspect_parser(sub) -> None:
    i = sub.add_parser("inspect", help="summarise a shard set: counts, sizes, resolutions, formats, rejects",
                       description="Print what the shard set at DEST holds.")
    i.add_argument("dest", metavar="DEST", help="folder or s3:// prefix holding manifest.json")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_storage_flags(i)
    i.set_defaults(func=run_shards_inspect)


def add_merge_parser(sub) -> None:
    m = sub.add_parser("merge", help="join the manifests of `create --part i/N` runs into one",
                       description="After all N `shards create --part i/N --out DEST` runs finished, write "
                                   "DEST/manifest.json (every part's shards), DEST/rejects.jsonl and "
                                   "DEST/report.json. Shards are not copied.")
    m.add_argument("dest", metavar="DEST", help="the --out the parts were written to")
    m.add_argument("--json", action="store_true", help="print the merged report as JSON")
    add_storage_flags(m)
    m.set_defaults(func=run_shards_merge)


def summary(report: CreateReport) -> str:
    """One paragraph: what was written, what was left out and why, where the manifest is."""
    rate = report.report.get("images_per_second")
    if rate is None:
        rate = report.inputs / report.seconds if report.seconds > 0 else 0.0
    reasons = ", ".join(f"{n} {r}" for r, n in report.rejected_by_reason().items())
    rejected = f"rejected {len(report.rejected)}" + (f" ({reasons})" if reasons else "")
    state = (" (already complete: nothing to do)" if report.already_complete
             else f" (resumed after {report.resumed_from} inputs)" if report.resumed_from else "")
    return (f"shards create: {report.inputs} input files in {report.seconds:.1f}s ({rate:.0f}/s){state}: "
            f"wrote {report.written} samples into {len(report.shards)} shard(s), {rejected}. "
            f"Manifest: {report.manifest_url}"
            + (" (rejected files are listed in rejects.jsonl next to it)." if report.rejected else "."))


def run_shards_create(args) -> int:
    if args.samples_per_shard < 1:
        raise ShardError(f"--samples-per-shard must be at least 1, got {args.samples_per_shard}")
    if args.workers < 0:
        raise ShardError(f"--workers must be 0 or more, got {args.workers}")
    report = create_shards(
        args.sources, args.out, progress=not (args.quiet or args.json), workers=args.workers, timeout=args.timeout,
        memory_limit=args.worker_memory, retry_failed=args.retry_failed, metrics_port=args.metrics_port,
        storage=storage_from_args(args), http=HttpOptions(**values_from(args, HttpOptions, prefix=HTTP)),
        **values_from(args, Plan))
    for warning in report.warnings:
        print(f"shards create: warning: {warning}", file=sys.stderr, flush=True)
    print(json.dumps(report.report) if args.json else summary(report), flush=True)
    return 0


def run_shards_verify(args) -> int:
    from mocostream.shards import verify
    from tqdm import tqdm

    counts = {"shards": 0, "samples": 0}
    bar = None

    def on_shard(entry, problems):
        nonlocal bar
        if bar is None:  # after the manifest was read: an error before that is one clean line
            bar = tqdm(unit="shard", desc="verify", disable=args.quiet, dynamic_ncols=True)
        counts["shards"] += 1
        counts["samples"] += entry.get("samples", 0)
        for p in problems:
            bar.write(p, file=sys.stdout)
        bar.update()

    problems = verify(args.dest, decode=not args.no_decode, on_shard=on_shard, storage=storage_from_args(args))
    if bar is not None:
        bar.close()
    if problems:
        print(f"verify: {len(problems)} problem(s) in {args.dest}", flush=True)
        return 1
    print(f"verify: {counts['shards']} shards, {counts['samples']} samples OK"
          + (" (not decoded)" if args.no_decode else ", all decodable"), flush=True)
    return 0


def run_shards_inspect(args) -> int:
    from mocostream.shards import inspect
    from mocostream.shards.inspect import summary_text

    info = inspect(args.dest, storage=storage_from_args(args))
    print(json.dumps(info) if args.json else summary_text(info), flush=True)
    return 0


def run_shards_merge(args) -> int:
    from mocostream.shards import merge

    report = merge(args.dest, storage=storage_from_args(args))
    print(json.dumps(report) if args.json else
          f"shards merge: {report['parts']} parts, {report['written']} samples in {report['shards']} shards, "
          f"rejected {report['rejected']}. Manifest: {report['manifest']}", flush=True)
    return 0
