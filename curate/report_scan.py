"""What the report shows, read from `selection.parquet` in two streamed passes of record batches, so that
memory is bounded by the number of finest clusters plus what the report shows, never by the row count:

1. counts: per finest cluster (all rows, kept rows, duplicates), per reason, and the candidates for the largest
   duplicate groups (a Misra-Gries summary of `dup_of`: every group larger than rows/(capacity+1) survives);
2. samples: for the clusters chosen from those counts (the largest, and a seeded random draw of small ones) a
   uniform sample of their kept and of their dropped rows, and for the duplicate candidates their exact sizes,
   their kept row and a uniform sample of their dropped rows (bottom-k of seeded random priorities drawn in
   row order, kept per group as the batches pass: the same sample whatever the batch size).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

SHOWN_COLUMNS = ["key", "shard", "member", "reason", "dup_of"]


@dataclass
class Counts:
    """Pass 1: per finest cluster id (index), the rows, kept rows, duplicates and rows balanced out; rows per
    reason."""
    total: np.ndarray
    kept: np.ndarray
    duplicate: np.ndarray
    balanced: np.ndarray
    reasons: dict[str, int]
    rows: int = 0
    unclustered: int = 0  # rows whose cluster_0 is null or outside [0, levels[0])
    dup_candidates: list[str] = field(default_factory=list)


@dataclass
class Samples:
    """Pass 2: the rows the report shows (pyarrow tables of SHOWN_COLUMNS + cluster_*) and group sizes."""
    clusters: dict[int, pa.Table]  # cluster id -> its sampled rows, kept ones first
    dup_groups: list[tuple[str, int, pa.Table | None, pa.Table]]  # (kept key, size, its row, sampled dropped rows)


def open_selection(f) -> pq.ParquetFile:
    # pre_buffer off: with it, iter_batches keeps every column chunk it read until the file is closed
    # (pyarrow 26: allocations grow with the rows read, ~60 MiB per 10M keys), against the point of streaming.
    pf = pq.ParquetFile(f, pre_buffer=False)
    missing = {"key", "shard", "member", "kept", "cluster_0", "dup_of", "reason"} - set(pf.schema_arrow.names)
    if missing:
        raise ValueError(f"selection.parquet lacks the columns {sorted(missing)}")
    return pf


def count_rows(pf: pq.ParquetFile, clusters: int, *, batch_rows: int = 65536, capacity: int = 1024) -> Counts:
    """Pass 1 over `pf`; `clusters`: the number of finest clusters (report.json's levels[0]), which bounds
    the per-cluster arrays whatever ids the file holds."""
    c = Counts(*(np.zeros(clusters, np.int64) for _ in range(4)), reasons={})
    heavy = None
    for batch in pf.iter_batches(batch_size=batch_rows, columns=["cluster_0", "kept", "reason", "dup_of"]):
        c.rows += batch.num_rows
        ids = batch.column("cluster_0")
        valid = pc.fill_null(pc.and_(pc.greater_equal(ids, 0), pc.less(ids, clusters)), False)
        valid = valid.to_numpy(zero_copy_only=False)
        c.unclustered += int((~valid).sum())
        ids = ids.to_numpy(zero_copy_only=False)[valid].astype(np.int64)
        kept = pc.fill_null(batch.column("kept"), False).to_numpy(zero_copy_only=False)[valid]
        dup = pc.is_valid(batch.column("dup_of")).to_numpy(zero_copy_only=False)[valid]
        balanced = pc.fill_null(pc.equal(batch.column("reason"), "balanced_out"), False)
        balanced = balanced.to_numpy(zero_copy_only=False)[valid]
        c.total += np.bincount(ids, minlength=clusters)
        c.kept += np.bincount(ids[kept], minlength=clusters)
        c.duplicate += np.bincount(ids[dup], minlength=clusters)
        c.balanced += np.bincount(ids[balanced], minlength=clusters)
        for item in pc.value_counts(pc.fill_null(batch.column("reason"), "(none)")).to_pylist():
            c.reasons[item["values"]] = c.reasons.get(item["values"], 0) + item["counts"]
        heavy = merge_heavy(heavy, batch.column("dup_of"), capacity)
    if c.unclustered:
        log.warning("%d rows of selection.parquet have no finest cluster in [0, %d)", c.unclustered, clusters)
    if heavy is not None and heavy.num_rows:
        order = np.argsort(-heavy.column("n").to_numpy(), kind="stable")
        c.dup_candidates = heavy.column("k").take(order).to_pylist()
    return c


def merge_heavy(summary: pa.Table | None, values: pa.Array, capacity: int) -> pa.Table:
    """A Misra-Gries summary of the non-null `values` merged into `summary` (columns k, n), keeping at most
    `capacity` entries: counts are summed, then the (capacity+1)-th largest is subtracted from all and what
    falls to zero is dropped (a mergeable summary: each count is low by at most rows/(capacity+1))."""
    counts = pc.value_counts(values.drop_null())
    table = pa.table({"k": counts.field("values").cast(pa.string()), "n": counts.field("counts")})
    if summary is not None:
        table = pa.concat_tables([summary, table]).group_by("k").aggregate([("n", "sum")])
        table = pa.table({"k": table.column("k"), "n": table.column("n_sum")})
    if table.num_rows <= capacity:
        return table
    n = table.column("n").to_numpy()
    cut = np.partition(n, len(n) - capacity - 1)[len(n) - capacity - 1]
    table = table.filter(pc.greater(table.column("n"), cut))
    return pa.table({"k": table.column("k"), "n": pc.subtract(table.column("n"), cut)})


def choose_clusters(total: np.ndarray, largest: int, small: int, seed: int) -> tuple[list[int], list[int]]:
    """The `largest` clusters by size (ties: lower id first), and a seeded random draw of `small` clusters
    among the other non-empty ones no larger than the median non-empty cluster."""
    nonempty = np.flatnonzero(total)
    order = nonempty[np.lexsort((nonempty, -total[nonempty]))]
    top = order[:largest]
    rest = order[largest:]
    pool = np.sort(rest[total[rest] <= np.median(total[nonempty])]) if len(nonempty) else rest
    drawn = np.random.default_rng(seed).choice(pool, min(small, len(pool)), replace=False) if len(pool) else pool
    return [int(i) for i in top], sorted(int(i) for i in drawn)


def bottom_k(held: pa.Table | None, new: pa.Table, k: int) -> pa.Table:
    """The rows with the `k` smallest priorities `_p` in each group `_g`, over `held` and `new` together."""
    table = new if held is None else pa.concat_tables([held, new])
    if table.num_rows == 0:
        return table
    table = table.sort_by([("_g", "ascending"), ("_p", "ascending")])
    groups = table.column("_g").to_numpy()
    starts = np.r_[0, np.flatnonzero(groups[1:] != groups[:-1]) + 1]
    rank = np.arange(len(groups)) - np.repeat(starts, np.diff(np.r_[starts, len(groups)]))
    return table.filter(pa.array(rank < k))


def _with_group(table: pa.Table, group: pa.Array, rng: np.random.Generator) -> pa.Table:
    return table.append_column("_g", group).append_column("_p", pa.array(rng.random(table.num_rows)))


def sample_rows(pf: pq.ParquetFile, shown: list[int], candidates: list[str], *, per_cluster: int, per_group: int,
                groups: int, seed: int, batch_rows: int = 65536) -> Samples:
    """Pass 2 over `pf`: up to `per_cluster` kept and as many dropped rows of each cluster in `shown`, and
    the `groups` largest duplicate groups among `candidates` with up to `per_group` dropped rows each."""
    levels = sorted((n for n in pf.schema_arrow.names if n.startswith("cluster_")), key=lambda n: int(n[8:]))
    columns = SHOWN_COLUMNS + ["kept"] + levels
    # One generator per kind of sample, each drawing in row order: the samples do not depend on batch_rows.
    rng_grid, rng_drops, rng_heads = (np.random.default_rng([seed, i]) for i in range(3))
    shown_ids, cand = pa.array(shown, pa.int64()), pa.array(candidates, pa.string())
    grid = drops = heads = None
    sizes = np.zeros(len(candidates), np.int64)
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        table = pa.Table.from_batches([batch])
        ids = table.column("cluster_0").cast(pa.int64())
        mine = table.filter(pc.fill_null(pc.is_in(ids, value_set=shown_ids), False))
        if mine.num_rows:
            not_kept = pc.invert(pc.fill_null(mine.column("kept"), False)).cast(pa.int64())
            group = pc.add(pc.multiply(mine.column("cluster_0").cast(pa.int64()), 2), not_kept)
            grid = bottom_k(grid, _with_group(mine, group, rng_grid), per_cluster)
        at = pc.index_in(table.column("dup_of").cast(pa.string()), value_set=cand)
        dup = table.filter(pc.is_valid(at))
        if dup.num_rows:
            index = at.drop_null().cast(pa.int64())
            sizes += np.bincount(index.to_numpy(), minlength=len(candidates))
            drops = bottom_k(drops, _with_group(dup, index, rng_drops), per_group)
        own = pc.index_in(table.column("key").cast(pa.string()), value_set=cand)
        head = table.filter(pc.is_valid(own))
        if head.num_rows:
            head = _with_group(head, own.drop_null().cast(pa.int64()), rng_heads)
            heads = bottom_k(heads, head, 1)
    return Samples(_by_cluster(grid, per_cluster), _largest_groups(candidates, sizes, heads, drops, groups))


def _by_cluster(grid: pa.Table | None, per_cluster: int) -> dict[int, pa.Table]:
    """Each cluster's rows: its kept ones first, half the places each when both kinds have enough."""
    out: dict[int, pa.Table] = {}
    if grid is None:
        return out
    for cluster in sorted(set(grid.column("cluster_0").to_pylist())):
        rows = grid.filter(pc.equal(grid.column("cluster_0"), cluster))
        kept = rows.filter(pc.equal(pc.bit_wise_and(rows.column("_g"), 1), 0))
        dropped = rows.filter(pc.equal(pc.bit_wise_and(rows.column("_g"), 1), 1))
        n_kept = min(kept.num_rows, max(per_cluster // 2, per_cluster - dropped.num_rows))
        n_dropped = min(dropped.num_rows, per_cluster - n_kept)
        out[cluster] = pa.concat_tables([kept.slice(0, n_kept), dropped.slice(0, n_dropped)])
    return out


def _largest_groups(candidates, sizes, heads, drops, groups):
    order = [int(i) for i in np.lexsort((np.arange(len(sizes)), -sizes)) if sizes[i] > 0][:groups]
    out = []
    for i in order:
        head = heads.filter(pc.equal(heads.column("_g"), i)) if heads is not None else None
        rows = drops.filter(pc.equal(drops.column("_g"), i))
        out.append((candidates[i], int(sizes[i]), head if head is not None and head.num_rows else None, rows))
    return out
