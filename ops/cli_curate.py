"""`mocostream curate [run] DATA | embed DATA | cluster | select`: CLI glue around curate/ (ops/curate_job.py runs it)."""
from __future__ import annotations

import argparse
import json
import os

from .storage_flags import add_storage_flags

STAGES = ("run", "embed", "cluster", "select")

DESCRIPTION = """\
Make uncurated image data worth training on: embed every sample with a frozen backbone, cluster the
embeddings into a tree (hierarchical k-means), drop semantic near-duplicates within each finest cluster and
sample the tree down to a balanced subset (large clusters cut, small ones kept whole).

  mocostream curate DATA --embed-with FILE --out DEST [--keep-fraction F | --target-size N]

runs the three stages; each is also a command of its own (embed, cluster, select) and every one is resumable:
rerun the same command and it continues. DEST then holds embeddings/, clusters/, selection.parquet (a row per
sample: kept, cluster ids, dup_of, reason), report.json and a manifest: `mocostream train --data DEST` trains on
exactly the kept samples, reading the original shards (--materialise also writes them as a shard set in
DEST/shards). Every stage runs on several processes under torchrun (shards, then select's buckets, split by
rank)."""


def add_curate_parser(sub) -> None:
    p = sub.add_parser("curate", help="embed, cluster, deduplicate and balance a data set; train on the selection",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = p.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage, text in (("run", "all three stages (the default: `mocostream curate DATA ...`)"),
                        ("embed", "stage 1: embeddings of every sample (DEST/embeddings)"),
                        ("cluster", "stage 2: hierarchical k-means and the finest cluster of every sample"),
                        ("select", "stage 3: dedup and balanced sampling; selection.parquet, report, manifest")):
        q = stages.add_parser(stage, help=text, description=text)
        if stage in ("run", "embed"):
            add_embed_flags(q)
        else:
            q.add_argument("--out", required=True, metavar="DEST", help="the curation folder (local or s3://)")
        if stage in ("run", "cluster"):
            add_cluster_flags(q)
        if stage in ("run", "select"):
            add_select_flags(q)
        add_storage_flags(q, external=stage in ("run", "embed"))
        q.set_defaults(func=run_curate)


def add_embed_flags(q) -> None:
    q.add_argument("data", metavar="DATA", help="the data, as `train --data` takes it (manifest, folder, s3:// prefix, "
                                                 "brace pattern or shard list)")
    q.add_argument("--embed-with", required=True, metavar="FILE",
                   help="the embedder: a mocostream checkpoint (file or folder: its latest), an `export` file, or a "
                        "torchvision/timm/safetensors backbone state_dict (local or s3://)")
    q.add_argument("--out", required=True, metavar="DEST", help="the curation folder (local or s3://)")
    q.add_argument("--arch", help="the encoder, when FILE does not name it (a torchvision or timm state_dict)")
    q.add_argument("--image-size", type=int, help="input side (default: 32 for *_cifar archs, else 224)")
    q.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    q.add_argument("--workers", type=int, help="decode processes per rank (default: the rank's CPU budget)")
    q.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the backbone runs")
    q.add_argument("--metrics-port", type=int, default=0,
                   help="Prometheus endpoint of the embed job (rank r: port + local rank); 0 disables")
    q.add_argument("--metrics-addr", default="0.0.0.0", help="address the metrics endpoint binds to")


def add_cluster_flags(q) -> None:
    q.add_argument("--levels", help="clusters per level, finest first (e.g. 100000,10000,1000); default: the rule "
                                    "k0 = n / --cluster-size, each level above / --level-ratio")
    q.add_argument("--cluster-size", type=int, default=100, help="the rule: mean samples per finest cluster")
    q.add_argument("--level-ratio", type=int, default=10, help="the rule: clusters of a level per cluster above")
    q.add_argument("--max-levels", type=int, default=4, help="the rule: at most this many levels")
    q.add_argument("--fit-sample", type=int, default=1_000_000,
                   help="vectors the k-means is fitted on (memory: this x D x 4 bytes)")
    q.add_argument("--iterations", type=int, default=20, help="k-means iterations")
    if not any(a.dest == "seed" for a in q._actions):
        q.add_argument("--seed", type=int, default=0, help="seed of the sample, the k-means and the sampling")


def add_select_flags(q) -> None:
    q.add_argument("--keep-fraction", type=float, help="keep this fraction of the samples (default: all that are "
                                                       "not duplicates)")
    q.add_argument("--target-size", type=int, help="keep this many samples (instead of --keep-fraction)")
    q.add_argument("--dedup-eps", type=float, default=0.08,
                   help="a sample whose cosine similarity to a kept one of its cluster exceeds 1 - eps is a duplicate "
                        "(cosine of the embeddings centred on their mean, as the clusters are)")
    q.add_argument("--select-memory", type=int, default=2 << 30,
                   help="bytes of embeddings held at once (the selection works through buckets of this size)")
    q.add_argument("--work-dir", help="where select keeps its work files, shared by its ranks (default: "
                                      "DEST/.select-work; for a remote DEST a temporary folder on one process, "
                                      "DEST/.select-work/ through its storage on several)")
    q.add_argument("--materialise", action="store_true", help="also write the kept samples as a shard set in "
                                                              "DEST/shards (with the shard tool's writer)")
    q.add_argument("--materialise-format", default="tar", choices=("tar", "parquet"), help="its shard format")
    q.add_argument("--samples-per-shard", type=int, default=1000, help="its shards' size")
    if not any(a.dest == "seed" for a in q._actions):
        q.add_argument("--seed", type=int, default=0, help="seed of the sampling")


def with_default_stage(argv: list[str]) -> list[str]:
    """`curate DATA ...` is `curate run DATA ...` (only when curate is the command: the first word that is
    not a global option)."""
    i = next((j for j, a in enumerate(argv) if not a.startswith("-")), None)
    if i is not None and argv[i] == "curate" and i + 1 < len(argv) and argv[i + 1] not in (*STAGES, "-h", "--help"):
        return [*argv[: i + 1], "run", *argv[i + 1:]]
    return argv


def _check(args) -> None:
    """Every option a later stage uses, checked before the first stage starts (no error after hours of work)."""
    from mocostream.curate.layout import CurateError
    from mocostream.curate.levels import parse_levels
    from mocostream.curate.settings import SelectConfig

    if getattr(args, "levels", None):
        parse_levels(args.levels)
    if hasattr(args, "keep_fraction"):
        SelectConfig(args.out, args.keep_fraction, args.target_size, args.dedup_eps, args.seed,
                     args.select_memory).check()
        if args.materialise and args.samples_per_shard < 1:
            raise CurateError("--samples-per-shard must be >= 1")
    for name in ("batch_size", "image_size", "fit_sample", "iterations", "cluster_size", "max_levels"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise CurateError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if getattr(args, "workers", None) is not None and args.workers < 0:
        raise CurateError(f"--workers must be >= 0, got {args.workers}")


def run_curate(args) -> int:
    _check(args)
    from .curate_job import finish, run_cluster, run_embed, run_select, start

    out = {}
    try:
        if args.stage in ("run", "embed"):
            out["embed"] = run_embed(args, start(args.device))
        if args.stage in ("run", "cluster"):
            start("cpu")
            out["cluster"] = run_cluster(args)
        if args.stage in ("run", "select"):
            start("cpu")
            out["select"] = run_select(args)
    finally:
        finish()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(out if args.stage == "run" else out[args.stage]))
    return 0
