"""`mocostream shards ...`: CLI glue around shards.create_shards (no logic of its own)."""
from __future__ import annotations

import argparse

from shards import REASONS, CreateReport, ShardError, create_shards


def add_shards_parser(subparsers) -> None:
    """Register `shards create` on the main CLI's subparsers."""
    shards = subparsers.add_parser(
        "shards", help="create training shards from folders of images",
        description="Create and manage training shards (webdataset tar or parquet).")
    sub = shards.add_subparsers(dest="shards_command", metavar="COMMAND", required=True)
    create = sub.add_parser(
        "create", help="validate, normalise and pack images into shards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Walk SRC folders recursively (sorted, so reruns give byte-identical shards), decode every\n"
            "file fully with PIL, and pack the good images into shards at DEST. Bad files are left out\n"
            "and listed in DEST/rejects.jsonl with a reason:\n"
            f"  {', '.join(REASONS)}.\n"
            "Images are EXIF-rotated; upright RGB JPEG/PNG/WebP are kept byte-for-byte, anything else\n"
            "is converted to RGB (alpha on white, first frame) and stored as JPEG quality 95.\n"
            "DEST/manifest.json (shard names, sample counts, bytes, sha256) is written last.\n"
            "The label of an image is the name of the folder it is in."),
        epilog=("example:\n  mocostream shards create data/train --out s3://bucket/imagenet/train "
                "--samples-per-shard 2000\n\nFor s3:// destinations the endpoint and keys come from "
                "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."))
    create.add_argument("sources", nargs="+", metavar="SRC",
                        help="local folder(s) of images, searched recursively; files at any depth are inputs")
    create.add_argument("--out", required=True, metavar="DEST",
                        help="destination: a local folder (created if missing) or s3://bucket/prefix; "
                             "must not already hold a manifest.json")
    create.add_argument("--format", choices=["tar", "parquet"], default="tar", dest="fmt",
                        help="tar: webdataset shards (<key>.jpg|png|webp + <key>.json) each with a DALI .idx "
                             "index; parquet: one row per image (image bytes + metadata columns), "
                             "row groups of 256 (default: %(default)s)")
    create.add_argument("--samples-per-shard", type=int, default=1000, metavar="N",
                        help="images per shard; the last shard may hold fewer (default: %(default)s)")
    create.add_argument("--prefix", default="shard", metavar="P",
                        help="shard file names are P-NNNNNN.tar / .parquet; letters, digits, '_' and '-' "
                             "(default: %(default)s)")
    create.add_argument("--quiet", action="store_true",
                        help="no progress bar (the summary is still printed)")
    create.set_defaults(func=run_shards_create)


def summary(report: CreateReport) -> str:
    """One paragraph: what was written, what was left out and why, where the manifest is."""
    rate = report.inputs / report.seconds if report.seconds > 0 else 0.0
    reasons = ", ".join(f"{n} {r}" for r, n in report.rejected_by_reason().items())
    rejected = f"rejected {len(report.rejected)}" + (f" ({reasons})" if reasons else "")
    return (f"shards create: {report.inputs} input files in {report.seconds:.1f}s ({rate:.0f}/s): "
            f"wrote {report.written} samples into {len(report.shards)} shard(s), {rejected}. "
            f"Manifest: {report.manifest_url}"
            + (" (rejected files are listed in rejects.jsonl next to it)." if report.rejected else "."))


def run_shards_create(args) -> int:
    if args.samples_per_shard < 1:
        raise ShardError(f"--samples-per-shard must be at least 1, got {args.samples_per_shard}")
    report = create_shards(args.sources, args.out, fmt=args.fmt, samples_per_shard=args.samples_per_shard,
                           prefix=args.prefix, progress=not args.quiet)
    print(summary(report), flush=True)
    return 0
