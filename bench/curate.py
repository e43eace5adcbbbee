"""Curation at scale on synthetic embeddings: the project's own cluster and select stages on a DEST whose
embeddings/ is written here (what `curate embed` would write), without images or a backbone.

    python bench/curate.py                        # 10M vectors, D 128
    python bench/curate.py --vectors 1000000      # a quicker check

The vectors: a mixture of --concepts concepts with Zipf-distributed weights (a long tail: the rarest concepts
have a handful of members), each member its concept's centre plus noise; duplicate bursts (a few images copied
hundreds to thousands of times with a tiny change, --burst-share of the data); with --common, a shared
non-negative component added to every vector; all L2-normalised, stored fp16
in shards of --per-shard vectors. Each stage runs in a child process of its own, which reports its wall time
and its peak RSS (VmHWM): fit time, assignment vectors/s per core, selection time, and the truth: how many
copies of each burst survive dedup and how balanced the kept set is over the concepts.
The last line printed is JSON with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def synthesize(dest: Path, args) -> dict:
    """embeddings/<shard>.parquet, _meta.json and _index.parquet for args.vectors vectors; returns the truth."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mocostream.curate.tables import embedding_table

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.concepts, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, args.concepts + 1) ** args.zipf
    weights /= weights.sum()
    bursts = max(1, int(args.vectors * args.burst_share / 500))  # bursts of ~500 copies on average
    burst_sizes = rng.multinomial(int(args.vectors * args.burst_share), 1.0 / np.arange(1, bursts + 1) /
                                  (1.0 / np.arange(1, bursts + 1)).sum())
    burst_base = rng.standard_normal((bursts, args.dim)).astype(np.float32)
    # every vector: a concept member, or a copy in a burst; the data order is random
    kind = np.concatenate([rng.choice(args.concepts, args.vectors - int(burst_sizes.sum()), p=weights),
                           -1 - np.repeat(np.arange(bursts), burst_sizes)])
    rng.shuffle(kind)
    common = np.abs(np.random.default_rng(99).standard_normal(args.dim)).astype(np.float32)
    common *= args.common / np.linalg.norm(common)
    (dest / "embeddings").mkdir(parents=True)
    shards = -(-args.vectors // args.per_shard)
    for s in range(shards):
        k = kind[s * args.per_shard:(s + 1) * args.per_shard]
        x = np.where((k >= 0)[:, None], centres[np.maximum(k, 0)], burst_base[np.maximum(-1 - k, 0)])
        noise = np.where(k >= 0, args.spread, 1e-3)[:, None]
        x = x + noise * rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(args.dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        if args.common:  # a shared non-negative component, as pooled post-ReLU features have
            x += common
            x /= np.linalg.norm(x, axis=1, keepdims=True)
        t = embedding_table([f"s{s}-{i}" for i in range(len(k))], f"synthetic-{s:06d}.tar",
                            np.arange(len(k), dtype=np.int32), x.astype(np.float16), {"samples": len(k), "skipped": 0})
        pq.write_table(t, dest / "embeddings" / f"synthetic-{s:06d}.parquet")
    meta = {"data": "synthetic", "data_shards": shards, "data_fingerprint": "synthetic"}
    (dest / "embeddings" / "_meta.json").write_text(json.dumps(meta))
    rows = [min(args.per_shard, args.vectors - s * args.per_shard) for s in range(shards)]
    index = pa.table({"shard": np.arange(shards), "name": [f"synthetic-{s:06d}.tar" for s in range(shards)],
                      "stem": [f"synthetic-{s:06d}" for s in range(shards)], "rows": rows, "samples": rows,
                      "skipped": [0] * shards})
    pq.write_table(index.replace_schema_metadata({"mocostream_curate": json.dumps(meta)}),
                   dest / "embeddings" / "_index.parquet")
    np.save(dest / "truth.npy", kind)
    return {"bursts": int(bursts), "burst_vectors": int(burst_sizes.sum()), "largest_burst": int(burst_sizes.max())}


def stage(args) -> None:
    """One stage in this (child) process; prints its figures as JSON."""
    import faiss

    from mocostream.curate.cluster import ClusterConfig, cluster
    from mocostream.curate.select import SelectConfig, select
    from mocostream.pipeline.filesystems import Storage

    threads = len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    if args.stage == "cluster":
        levels = [int(k) for k in args.levels.split(",")] if args.levels else None
        out = cluster(ClusterConfig(args.dest, levels, fit_sample=args.fit_sample, iterations=args.iterations),
                      storage=Storage())
        out["assign_vectors_per_second_per_core"] = round(out["assigned"] / out["assign_seconds"] / threads)
    else:
        report = select(SelectConfig(args.dest, keep_fraction=args.keep_fraction, dedup_eps=args.dedup_eps,
                                     select_memory=args.select_memory), storage=Storage())
        out = {k: report[k] for k in ("inputs", "kept", "dropped", "buckets")}
    out.update(seconds=round(time.perf_counter() - t0, 2), peak_rss_mb=round(peak_rss() / 2**20), threads=threads)
    print(json.dumps(out))


def scored(dest: Path, per_shard: int) -> dict:
    """The selection against the truth: copies kept per burst, concept balance before and after."""
    import pyarrow.parquet as pq

    kind = np.load(dest / "truth.npy")
    sel = pq.read_table(dest / "selection.parquet", columns=["key", "kept"]).to_pydict()
    shard_row = np.array([tuple(map(int, k[1:].split("-"))) for k in sel["key"]])  # keys are s<shard>-<row>
    kept = np.zeros(len(kind), bool)
    kept[shard_row[:, 0] * per_shard + shard_row[:, 1]] = np.array(sel["kept"])
    bursts = kind < 0
    copies = np.bincount(-1 - kind[bursts & kept], minlength=int(-kind.min()) if bursts.any() else 0)
    concepts = kind >= 0
    before = np.bincount(kind[concepts])
    after = np.bincount(kind[concepts & kept], minlength=len(before))
    ratio = lambda c: float(c.max() / max(1, c[c > 0].min()))  # noqa: E731
    return {"copies_kept_per_burst": round(float(copies.mean()), 2) if len(copies) else None,
            "concept_max_min_before": ratio(before), "concept_max_min_after": ratio(after),
            "rarest_tenth_kept": round(float(after[before <= np.quantile(before, 0.1)].sum() /
                                             max(1, before[before <= np.quantile(before, 0.1)].sum())), 3)}


def child(args, name: str) -> dict:
    cmd = [sys.executable, __file__, "--stage", name, "--dest", args.dest, "--fit-sample", str(args.fit_sample),
           "--iterations", str(args.iterations), "--keep-fraction", str(args.keep_fraction), "--dedup-eps",
           str(args.dedup_eps), "--select-memory", str(args.select_memory)] + (["--levels", args.levels] if args.levels else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vectors", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--per-shard", type=int, default=10_000)
    p.add_argument("--concepts", type=int, default=20_000)
    p.add_argument("--zipf", type=float, default=1.1, help="concept weights ~ 1 / rank^zipf")
    p.add_argument("--spread", type=float, default=0.6, help="noise of a concept's members (norm)")
    p.add_argument("--burst-share", type=float, default=0.1)
    p.add_argument("--common", type=float, default=0.0,
                   help="norm of a fixed non-negative vector added to every (unit) vector before it is normalised "
                        "again, as ReLU features share one (3: raw cosines ~0.9 between unrelated vectors)")
    p.add_argument("--levels", help="as curate's --levels (default: its rule)")
    p.add_argument("--fit-sample", type=int, default=1_000_000)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--keep-fraction", type=float, default=0.5)
    p.add_argument("--dedup-eps", type=float, default=0.01)
    p.add_argument("--select-memory", type=int, default=2 << 30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dest", help="where to build the DEST (default: a temporary folder, removed)")
    p.add_argument("--stage", choices=("cluster", "select"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage:
        return stage(args)
    keep = args.dest is not None
    args.dest = args.dest or tempfile.mkdtemp(prefix="mocostream-bench-curate-")
    dest = Path(args.dest)
    try:
        t0 = time.perf_counter()
        truth = synthesize(dest, args)
        out = {"cpu": cpu_model(), "vectors": args.vectors, "dim": args.dim, "shards": -(-args.vectors // args.per_shard),
               "synthesize_seconds": round(time.perf_counter() - t0, 1), **truth}
        out["cluster"] = child(args, "cluster")
        out["select"] = child(args, "select")
        out["score"] = scored(dest, args.per_shard)
        print(json.dumps(out))
    finally:
        if not keep:
            shutil.rmtree(dest, ignore_errors=True)


if __name__ == "__main__":
    main()
