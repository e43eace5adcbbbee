"""Stage 2: hierarchical k-means over the embeddings (Vo et al. 2024), fitted on a bounded sample.

1. A sample of at most `fit_sample` vectors, uniform over the rows of the shards read for it (all shards when
   the data has at most 4x the sample, else a seeded random subset of shards holding about 4x the sample).
   Its mean vector is DEST/clusters/mean.npy; every comparison of the tree and of select's dedup is made on
   centred vectors, (v - mean) / |v - mean| (kmeans.centred): the embeddings of a ReLU backbone are all
   non-negative, so without it any two images are similar (cosine ~0.96 to the nearest other image).
2. Level 0 (finest): spherical k-means on the sample (kmeans.py). Level i+1: spherical k-means on the level-i
   centroids, each centroid one point whatever its cluster's size, so dense regions (a repost storm, a junk
   template) do not take over the coarse levels; parents[i][c] = the level-(i+1) centroid nearest to c.
3. Every (centred) vector assigned to its nearest level-0 centroid, shard by shard (every world-th shard per rank
   under torchrun), into DEST/clusters/assign/<stem>.npy; a shard's file is skipped by a rerun.
Rank 0 fits while the others wait; the fit is skipped when DEST/clusters/tree.json holds one made with the same
options from the same embeddings, and refused when it was made with others.
"""
from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np

from mocostream.pipeline.filesystems import Storage

from .group import barrier, mine, on_rank0, rank_world
from .kmeans import Assigner, centred, kmeans
from .layout import ASSIGN, MEAN, TREE, CurateError, Dest, assign_name
from .levels import check_levels, level_sizes, rule_text
from .tables import listing, read_embeddings, read_index, vectors_of

log = logging.getLogger("mocostream.curate")


@dataclass
class ClusterConfig:
    out: str
    levels: list[int] | None = None  # finest first; None: the rule (levels.py)
    cluster_size: int = 100
    level_ratio: int = 10
    max_levels: int = 4
    fit_sample: int = 1_000_000
    iterations: int = 20
    seed: int = 0


def centroids_name(level: int) -> str:
    return f"clusters/centroids_level{level}.npy"


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def load_npy(dest: Dest, name: str) -> np.ndarray:
    raw = dest.read_bytes(name)
    if raw is None:
        raise CurateError(f"not found: {dest.location(name)} (run `mocostream curate cluster` first)")
    return np.load(io.BytesIO(raw), allow_pickle=False)


def load_mean(dest: Dest) -> np.ndarray:
    """The fit sample's mean vector; a DEST clustered without one (by a version that compared raw vectors) must
    be clustered again: its tree and assignments were made on uncentred vectors."""
    raw = dest.read_bytes(MEAN)
    if raw is None:
        raise CurateError(f"{dest.location(MEAN)} not found: DEST/clusters was made on uncentred vectors; remove "
                          f"DEST/clusters and rerun `mocostream curate cluster --out {dest.url}`, then select")
    return np.load(io.BytesIO(raw), allow_pickle=False)


def cluster(cfg: ClusterConfig, *, storage: Storage) -> dict:
    """Fit (rank 0, unless done) and assign this rank's shards; returns the tree's shape and this rank's counts."""
    if cfg.fit_sample < 1 or cfg.iterations < 1:
        raise CurateError("--fit-sample and --iterations must be >= 1")
    dest = Dest(cfg.out, storage)
    index, _ = read_index(dest)
    rows = index.column("rows").to_numpy()
    n = int(rows.sum())
    fit_n = min(n, cfg.fit_sample)
    levels = cfg.levels or level_sizes(n, fit_n, cfg.cluster_size, cfg.level_ratio, cfg.max_levels)
    check_levels(levels, n, fit_n)
    options = {**asdict(cfg), "levels": levels, "out": None, "embeddings": _index_digest(index)}
    tree = on_rank0(lambda: _fitted(dest, index, options, fit_n, cfg))
    assigner, mean = Assigner(load_npy(dest, centroids_name(0))), load_mean(dest)
    done = on_rank0(lambda: listing(dest, ASSIGN, ".npy"))
    stems = index.column("stem").to_pylist()
    todo = [j for j in mine(len(stems)) if assign_name(stems[j]) not in done]
    t0 = time.perf_counter()
    assigned = 0
    for j in todo:
        vectors = vectors_of(read_embeddings(dest, stems[j], ("vector",)))
        dest.write_bytes(assign_name(stems[j]), npy_bytes(assigner(centred(vectors, mean))[0]))
        assigned += len(vectors)
    seconds = time.perf_counter() - t0
    barrier()
    rank, world = rank_world()
    log.info("rank %d: assigned %d vectors of %d shards to %d clusters in %.1f s (%s)", rank, assigned, len(todo),
             tree["levels"][0], seconds, assigner.describe())
    return {"rank": rank, "world": world, "levels": tree["levels"], "rule": tree["rule"], "assigned": assigned,
            "assign_seconds": round(seconds, 3), "fit_seconds": tree["fit"].get("seconds")}


def _index_digest(index) -> str:
    """Identifies the embeddings the tree was fitted on (which shards, how many rows each)."""
    h = hashlib.blake2b(digest_size=16)
    for column in ("shard", "rows"):
        h.update(index.column(column).to_numpy().astype(np.int64).tobytes())
    return h.hexdigest()


def _fitted(dest: Dest, index, options: dict, fit_n: int, cfg: ClusterConfig) -> dict:
    """tree.json, fitting the tree first unless DEST holds one made with these options."""
    old = dest.read_json(TREE)
    if old is not None:
        if old.get("fit", {}).get("options") != options:
            changed = sorted(k for k in options if old.get("fit", {}).get("options", {}).get(k) != options[k])
            raise CurateError(f"{dest.location(TREE)} was made with other options or embeddings ({', '.join(changed)}): "
                              "use the same ones, or remove DEST/clusters (and what select made from it)")
        return old
    t0 = time.perf_counter()
    sample = _sample(dest, index, fit_n, cfg.seed)
    mean = sample.mean(axis=0, dtype=np.float64).astype(np.float32)
    dest.write_bytes(MEAN, npy_bytes(mean))
    centroids, parents = fit_tree(centred(sample, mean, inplace=True), options["levels"], cfg.iterations, cfg.seed)
    for level, c in enumerate(centroids):
        dest.write_bytes(centroids_name(level), npy_bytes(c.astype(np.float32)))
    tree = {"levels": [len(c) for c in centroids], "rule": rule_text(cfg.cluster_size, cfg.level_ratio, cfg.max_levels)
            if cfg.levels is None else f"given: --levels {','.join(map(str, cfg.levels))}",
            "parents": [p.tolist() for p in parents],
            "centre": {"file": MEAN, "norm": round(float(np.linalg.norm(mean)), 6), "of": "the fit sample",
                       "use": "k-means, assignment and select's dedup compare (v - mean) / |v - mean|"},
            "fit": {"options": options, "sample": len(sample), "seconds": round(time.perf_counter() - t0, 3),
                    "assignment": Assigner(centroids[0]).describe()}}
    dest.write_json(TREE, tree)  # last: its presence means the fit is complete
    log.info("fitted %d levels %s on %d sample vectors in %.1f s", len(centroids), tree["levels"], len(sample),
             tree["fit"]["seconds"])
    return tree


def fit_tree(sample: np.ndarray, levels: list[int], iterations: int, seed: int) -> tuple[list, list]:
    """(centroids per level, finest first; parents[i]: the level-(i+1) cluster of each level-i centroid)."""
    centroids = [kmeans(sample, levels[0], iterations, seed)]
    parents = []
    for level, k in enumerate(levels[1:], start=1):
        upper = kmeans(centroids[-1], min(k, len(centroids[-1])), iterations, seed + level)
        parents.append(Assigner(upper)(centroids[-1])[0])
        centroids.append(upper)
    return centroids, parents


def _sample(dest: Dest, index, fit_n: int, seed: int) -> np.ndarray:
    """At most fit_n vectors (float32), uniform over the rows of the shards read for it (see the module doc)."""
    rng = np.random.default_rng(seed)
    rows = index.column("rows").to_numpy()
    stems = index.column("stem").to_pylist()
    order = rng.permutation(len(stems))
    if rows.sum() > 4 * fit_n:
        order = order[: int(np.searchsorted(np.cumsum(rows[order]), 4 * fit_n)) + 1]
    order = np.sort(order)
    total = int(rows[order].sum())
    chosen = np.sort(rng.choice(total, size=min(fit_n, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(rows[order])])
    parts = []
    for k, j in enumerate(order.tolist()):
        lo, hi = np.searchsorted(chosen, [starts[k], starts[k + 1]])
        take = chosen[lo:hi] - starts[k]
        if len(take):
            parts.append(vectors_of(read_embeddings(dest, stems[j], ("vector",)))[take].astype(np.float32))
    return np.concatenate(parts)
