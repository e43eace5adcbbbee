"""Stage 3: drop semantic near-duplicates within each finest cluster, then sample the tree down to the budget.

Memory is bounded by the clusters plus one bucket, never by the data: dedup needs the members of a finest cluster
together, and they are spread over every shard, so the embeddings are first re-partitioned by cluster.
  0. counts: the finest clusters' sizes (one pass over the assignment files).
  1. buckets: finest clusters packed into B buckets of about --select-memory bytes (largest first, into the
     emptiest bucket; a cluster larger than that is a bucket of its own); one pass over the embeddings writes
     each row (reference, cluster, key, vector) to its bucket's file (Arrow IPC stream in the work folder).
  2. dedup: one bucket at a time, each cluster's members in data order (reference order), centred on the fit
     sample's mean as in the tree (cluster.py), through dedup.py; the result per bucket (reference, cluster,
     key, dup_of) is written; a rerun skips the buckets already done.
  3. quotas: survivors per finest cluster -> balanced sampling (balance.py) -> quota per finest cluster.
  4. decide: per bucket, the survivors of each cluster with the smallest seeded hash of their reference are kept
     (exactly the quota); a part of selection.parquet (every row) and the sorted kept references per bucket.
  5. the selection (the parts in bucket order), the selection manifest (kept.py), report.json, report.html
     (report.py), manifest.json last.
On several ranks (torchrun) every pass is split: steps 0 and 1 by data shard (every world-th, as embed), steps 2
and 4 by bucket (every world-th); the per-cluster counts are summed over the ranks, the quotas computed alike
on each, and rank 0 writes step 5. The result is the same on any number of ranks (each bucket is sorted by
cluster and reference before its dedup). Work files: curate/workfiles.py; removed at the end.
Peak memory per rank ~ 3 x max(--select-memory, the largest finest cluster's rows) (a bucket, sorted, and its
vectors as numpy) + O(finest clusters) + the bucket pass's write buffers (256 MB); work space ~ the embeddings'
size, shared by the ranks.
"""
from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mocostream.pipeline.filesystems import Storage

from .balance import balanced_quotas, level_sizes_up, mix
from .cluster import centroids_name, load_mean, load_npy
from .dedup import greedy_dedup
from .kept import refs, split_refs, write_kept, write_manifest
from .kmeans import centred
from .layout import REPORT, SELECTION, TREE, CurateError, Dest, assign_name, shard_urls
from .report import write_report
from .group import barrier, mine, rank_world, sum_over_ranks
from .settings import SelectConfig
from .tables import read_embeddings, read_index, vectors_of
from .workfiles import LocalWork, RemoteWork, open_work

log = logging.getLogger("mocostream.curate")

FLUSH_BYTES = 256 << 20
DROPPED = ("duplicate", "balanced_out")  # the reasons a row is not kept


@dataclass
class _Run:
    """What every pass of one select run shares."""
    dest: Dest
    work: LocalWork | RemoteWork
    stems: list[str]
    shards: np.ndarray  # data shard index of each index row
    names: pa.Array  # data name of each index row
    urls: pa.Array  # where each index row's shard is read: the name resolved against the data's folder
    parents: list[np.ndarray]
    k0: int
    mean: np.ndarray  # the fit sample's mean: dedup compares centred vectors, as the tree does


def select(cfg: SelectConfig, *, storage: Storage) -> dict | None:
    """The selection of a clustered DEST, on this rank's share; returns report.json's content on rank 0."""
    cfg.check()
    t0 = time.perf_counter()
    rank, world = rank_world()
    dest = Dest(cfg.out, storage)
    index, meta = read_index(dest)
    tree = dest.read_json(TREE)
    if tree is None:
        raise CurateError(f"{dest.location(TREE)} not found: run `mocostream curate cluster` into {dest.url} first")
    mean = load_mean(dest)
    run = _Run(dest, _open_work(dest, cfg, tree, world), index.column("stem").to_pylist(),
               index.column("shard").to_numpy(), index.column("name").combine_chunks(),
               shard_urls(index.column("name").combine_chunks(), meta.get("data_base", "")),
               [np.asarray(p, np.int64) for p in tree["parents"]], int(tree["levels"][0]), mean)
    try:
        sizes0 = sum_over_ranks(_counts(run))
        n = int(sizes0.sum())
        budget = n if cfg.keep_fraction is None and cfg.target_size is None else \
            cfg.target_size if cfg.target_size is not None else round(cfg.keep_fraction * n)
        dim = int(load_npy(dest, centroids_name(0)).shape[1])
        buckets = _bucket_pass(run, sizes0, dim, cfg.select_memory)
        barrier()
        for b in range(rank, buckets, world):
            _dedup_bucket(run, b, 1.0 - cfg.dedup_eps)
        barrier()
        survivors = sum_over_ranks(_survivors(run, buckets))
        quotas = balanced_quotas(survivors, run.parents, budget, cfg.seed)
        after, dropped = _decide_pass(run, buckets, quotas, cfg.seed)
        after, dropped = sum_over_ranks(after), dict(zip(DROPPED, sum_over_ranks(dropped).tolist()))
        barrier()
        report = _finish(cfg, run, tree, meta, index, n, dropped, sizes0, after, budget, buckets, t0) \
            if rank == 0 else None
        barrier()
    except BaseException:
        log.info("select stopped; its finished buckets stay in %s for a rerun", run.work.describe())
        raise
    finally:
        run.work.close()
    return report


def _finish(cfg: SelectConfig, run: _Run, tree: dict, meta: dict, index, n: int, dropped: dict, sizes0, after,
            budget: int, buckets: int, t0: float) -> dict:
    """Rank 0: selection.parquet from its parts, the selection manifest, the reports; the work files removed."""
    _merge_selection(run, buckets)
    fingerprint, kept = write_kept(run.dest, [run.work.fetch(f"kept-{b}.npy") for b in range(buckets)],
                                   dict(zip(run.shards.tolist(), run.names.to_pylist())), meta)
    report = _report(cfg, tree, meta, index, n, kept, dropped, sizes0, after, budget, fingerprint, buckets)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    run.dest.write_json(REPORT, report)
    log.info("report: %s", write_report(run.dest.url, run.dest.storage))
    write_manifest(run.dest, meta, fingerprint, n, kept)
    run.work.clear()
    return report


def _open_work(dest: Dest, cfg: SelectConfig, tree: dict, world: int):
    """The work folder: reused by a rerun with the same options, tree and ranks, emptied otherwise (rank 0)."""
    work = open_work(dest, cfg.work_dir, world)
    params = {"dedup_eps": cfg.dedup_eps, "select_memory": cfg.select_memory, "tree": tree["fit"], "world": world}
    if rank_world()[0] == 0 and work.read_params() != params:
        work.reset(params)
    barrier()
    return work


def _assignments(run: _Run, j: int) -> np.ndarray:
    return load_npy(run.dest, assign_name(run.stems[j]))


def _counts(run: _Run) -> np.ndarray:
    """Finest cluster sizes over this rank's shards."""
    sizes = np.zeros(run.k0, np.int64)
    for j in mine(len(run.stems)):
        sizes += np.bincount(_assignments(run, j), minlength=run.k0)
    return sizes


def pack(sizes: np.ndarray, row_bytes: int, budget: int) -> tuple[np.ndarray, int]:
    """(bucket of each cluster, buckets): largest clusters first, each into the emptiest bucket."""
    buckets = max(1, -(-int(sizes.sum()) * row_bytes // budget))
    heap = [(0, b) for b in range(buckets)]
    of = np.zeros(len(sizes), np.int32)
    for c in np.argsort(-sizes, kind="stable").tolist():
        load, b = heapq.heappop(heap)
        of[c] = b
        heapq.heappush(heap, (load + int(sizes[c]), b))
    return of, buckets


BUCKET_SCHEMA = {"ref": pa.int64(), "cluster": pa.int32(), "key": pa.string()}


def _part(b: int, rank: int) -> str:
    return f"bucket-{b}.{rank}.arrow"


def _bucket_pass(run: _Run, sizes0: np.ndarray, dim: int, memory: int) -> int:
    """Every row of this rank's shards into its cluster's bucket (a part per rank); skipped when this rank's
    finished pass is in the work folder."""
    of, buckets = pack(sizes0, 2 * dim + 48, memory)
    rank = rank_world()[0]
    done = f"buckets-{rank}.done"
    if run.work.exists(done):
        return buckets
    schema = pa.schema([*BUCKET_SCHEMA.items(), ("vector", pa.list_(pa.float16(), dim))])
    writers = [pa.ipc.new_stream(pa.OSFile(run.work.staging(_part(b, rank)), "wb"), schema) for b in range(buckets)]
    pending: list[list] = [[] for _ in range(buckets)]
    held, rows, shards = 0, 0, mine(len(run.stems))
    for j in shards:
        t = read_embeddings(run.dest, run.stems[j])
        cluster = _assignments(run, j)
        if len(cluster) != t.num_rows:
            raise CurateError(f"{run.dest.location(assign_name(run.stems[j]))} does not fit its embeddings: "
                              "remove DEST/clusters and cluster again")
        t = pa.table({"ref": refs(np.full(t.num_rows, run.shards[j]), t.column("member").to_numpy()),
                      "cluster": pa.array(cluster, pa.int32()), "key": t.column("key"), "vector": t.column("vector")},
                     schema=schema)
        order = np.argsort(of[cluster], kind="stable")
        bounds = np.searchsorted(of[cluster][order], np.arange(buckets + 1))
        t, rows = t.take(pa.array(order)), rows + t.num_rows
        for b in np.flatnonzero(np.diff(bounds)).tolist():
            pending[b].append(t.slice(bounds[b], bounds[b + 1] - bounds[b]))
        held += t.nbytes
        if held > FLUSH_BYTES or j == shards[-1]:
            for b in range(buckets):
                if pending[b]:
                    writers[b].write_table(pa.concat_tables(pending[b]))
            pending, held = [[] for _ in range(buckets)], 0
    for b, w in enumerate(writers):
        w.close()
        run.work.publish(_part(b, rank))
    with open(run.work.staging(done), "w") as f:
        f.write(str(buckets))
    run.work.publish(done)
    log.info("select: %d rows of %d shards into %d buckets", rows, len(shards), buckets)
    return buckets


def _read_bucket(run: _Run, b: int) -> pa.Table:
    """Bucket b: the parts of every rank, concatenated."""
    parts = []
    for rank in range(rank_world()[1]):
        with pa.memory_map(run.work.fetch(_part(b, rank))) as source:
            parts.append(pa.ipc.open_stream(source).read_all())
    return pa.concat_tables(parts)


def _dedup_bucket(run: _Run, b: int, threshold: float) -> None:
    """Each cluster of bucket b deduplicated in reference order; writes dedup-<b>.parquet (skipped when there)."""
    out = f"dedup-{b}.parquet"
    if run.work.exists(out):
        return
    t = _read_bucket(run, b)
    ref, cluster = t.column("ref").to_numpy(), t.column("cluster").to_numpy()
    order = np.lexsort((ref, cluster))
    t = t.take(pa.array(order))
    ref, cluster = ref[order], cluster[order]
    vectors = vectors_of(t) if t.num_rows else np.zeros((0, 1), np.float16)
    dup = np.full(t.num_rows, -1, np.int64)
    starts = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1]]) if t.num_rows else np.zeros(0, np.int64)
    for a, z in zip(starts.tolist(), np.r_[starts[1:], t.num_rows].tolist()):
        if z - a > 1:
            d = greedy_dedup(centred(vectors[a:z], run.mean), threshold)
            dup[a:z] = np.where(d >= 0, d + a, -1)
    dup_of = pc.take(t.column("key"), pa.array(dup, mask=dup < 0))
    result = pa.table({"ref": ref, "cluster": cluster.astype(np.int32), "key": t.column("key"), "dup_of": dup_of})
    pq.write_table(result, run.work.staging(out))
    run.work.publish(out)
    for rank in range(rank_world()[1]):
        run.work.remove(_part(b, rank))  # its vectors are no longer needed
    log.info("select: bucket %d: %d rows, %d duplicates", b, t.num_rows, int((dup >= 0).sum()))


def _survivors(run: _Run, buckets: int) -> np.ndarray:
    """Rows left after dedup per finest cluster, over this rank's buckets."""
    out = np.zeros(run.k0, np.int64)
    rank, world = rank_world()
    for b in range(rank, buckets, world):
        t = pq.read_table(run.work.fetch(f"dedup-{b}.parquet"), columns=["cluster", "dup_of"])
        alive = t.column("dup_of").is_null().to_numpy(zero_copy_only=False)
        out += np.bincount(t.column("cluster").to_numpy()[alive], minlength=run.k0)
    return out


SELECTION_SCHEMA_HEAD = [("key", pa.string()), ("shard", pa.string()), ("member", pa.int32()), ("kept", pa.bool_())]


def _selection_schema(levels: int) -> pa.Schema:
    return pa.schema([*SELECTION_SCHEMA_HEAD, *[(f"cluster_{i}", pa.int32()) for i in range(levels)],
                      ("dup_of", pa.string()), ("reason", pa.string())])


def _decide_pass(run: _Run, buckets: int, quotas: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's buckets: a part of selection.parquet and the sorted kept references each; (kept per finest
    cluster, dropped per reason of DROPPED)."""
    levels = len(run.parents) + 1
    schema = _selection_schema(levels)
    after, dropped = np.zeros(run.k0, np.int64), np.zeros(len(DROPPED), np.int64)
    rank, world = rank_world()
    for b in range(rank, buckets, world):
        t = pq.read_table(run.work.fetch(f"dedup-{b}.parquet"))
        kept, rows = _decide(run, t, quotas, seed, levels)
        pq.write_table(pa.table(rows, schema=schema), run.work.staging(f"selection-{b}.parquet"))
        run.work.publish(f"selection-{b}.parquet")
        ref, cluster = t.column("ref").to_numpy(), t.column("cluster").to_numpy()
        with open(run.work.staging(f"kept-{b}.npy"), "wb") as f:  # a file object: np.save would add ".npy"
            np.save(f, np.sort(ref[kept]), allow_pickle=False)
        run.work.publish(f"kept-{b}.npy")
        after += np.bincount(cluster[kept], minlength=run.k0)
        reasons = np.asarray(rows["reason"].to_numpy(zero_copy_only=False))
        dropped += np.array([int((reasons == r).sum()) for r in DROPPED], np.int64)
    return after, dropped


def _merge_selection(run: _Run, buckets: int) -> None:
    """selection.parquet: the buckets' parts in bucket order, streamed (one part in memory at a time)."""
    local = run.work.staging(SELECTION)
    with pq.ParquetWriter(local, _selection_schema(len(run.parents) + 1)) as writer:
        for b in range(buckets):
            writer.write_table(pq.read_table(run.work.fetch(f"selection-{b}.parquet")))
    run.dest.put_file(local, SELECTION)


def _decide(run: _Run, t: pa.Table, quotas: np.ndarray, seed: int, levels: int) -> tuple[np.ndarray, dict]:
    """(kept mask, selection columns) of one bucket's deduplicated rows."""
    ref, cluster = t.column("ref").to_numpy(), t.column("cluster").to_numpy().astype(np.int64)
    alive = t.column("dup_of").is_null().to_numpy(zero_copy_only=False)
    idx = np.flatnonzero(alive)
    order = idx[np.lexsort((ref[idx], mix(ref[idx], seed), cluster[idx]))]
    first = np.flatnonzero(np.r_[True, cluster[order][1:] != cluster[order][:-1]]) if len(order) else order
    rank = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
    kept = np.zeros(len(ref), bool)
    kept[order[rank < quotas[cluster[order]]]] = True
    shard, member = split_refs(ref)
    reason = np.where(kept, "kept", np.where(alive, "balanced_out", "duplicate"))
    rows = {"key": t.column("key"), "shard": pc.take(run.urls, pa.array(np.searchsorted(run.shards, shard))),
            "member": pa.array(member.astype(np.int32)), "kept": pa.array(kept)}
    chain = cluster
    for i in range(levels):
        rows[f"cluster_{i}"] = pa.array(chain.astype(np.int32))
        chain = run.parents[i][chain] if i < len(run.parents) else chain
    rows["dup_of"], rows["reason"] = t.column("dup_of"), pa.array(reason)
    return kept, rows


def _report(cfg: SelectConfig, tree: dict, meta: dict, index, n: int, kept: int, dropped: dict, sizes0, after,
            budget: int, fingerprint: str, buckets: int) -> dict:
    fraction = cfg.keep_fraction if cfg.keep_fraction is not None else budget / max(1, n)
    sizes = level_sizes_up(sizes0, tree["parents"])
    return {"inputs": n, "kept": kept, "dropped": dropped, "levels": tree["levels"], "keep_fraction": fraction,
            "target_size": budget, "dedup_eps": cfg.dedup_eps,
            "dedup_similarity": "cosine of centred vectors (v - mean) / |v - mean|, mean: clusters/mean.npy",
            "seed": cfg.seed,
            "cluster_sizes_before": sizes0.tolist(), "cluster_sizes_after": after.tolist(),
            "coarsest_sizes_before": sizes[-1].tolist(),
            "embed": {"data": meta.get("data"), "backbone": meta.get("backbone"), "image_size": meta.get("image_size"),
                      "transform": meta.get("transform"), "shards": index.num_rows,
                      "samples": int(pc.sum(index.column("samples")).as_py()),
                      "skipped": int(pc.sum(index.column("skipped")).as_py()),
                      "missing_shards": int(meta.get("data_shards", index.num_rows)) - index.num_rows},
            "fingerprint": fingerprint, "rule": tree["rule"], "buckets": buckets}
