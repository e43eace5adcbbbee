"""Spherical k-means and nearest-centroid assignment with faiss, at sizes where plain k-means is too slow.

Vectors and centroids are L2-normalised; similarity is the inner product (cosine).
- k <= FLAT_MAX: faiss k-means over the points (exact assignment in every iteration).
- larger k: two stages (a common way to fit many centroids on CPUs): sqrt(k) coarse centroids, then each coarse
  cell's points get their share of the k centroids (proportional to the cell's size) fitted on them alone.
  Cost per iteration ~ n * 2 sqrt(k) * D instead of n * k * D.
Assignment: exact (a flat index) up to FLAT_MAX centroids; above, an IVF index over the centroids (sqrt(k)
lists, NPROBE probed): approximate, a vector near a cell border may go to its second-nearest centroid.
GPU faiss (a faiss build with GPU support, e.g. `pip install faiss-gpu-cu12` in place of faiss-cpu) is used when
it sees a GPU: the flat indexes of k-means and of exact assignment move to every visible GPU; MOCOSTREAM_FAISS_GPU=0
keeps them on the CPU.
"""
from __future__ import annotations

import math
import os

import numpy as np

FLAT_MAX = 4096
NPROBE = 16


def _faiss():
    import faiss

    return faiss


def faiss_gpus() -> int:
    """GPUs faiss can use here: 0 with faiss-cpu, without a GPU, or with MOCOSTREAM_FAISS_GPU=0."""
    if os.environ.get("MOCOSTREAM_FAISS_GPU", "1") == "0":
        return 0
    get = getattr(_faiss(), "get_num_gpus", None)
    return get() if get else 0


def flat_index(d: int):
    """An exact inner-product index: on every GPU faiss sees, else on the CPU."""
    faiss = _faiss()
    index = faiss.IndexFlatIP(d)
    return faiss.index_cpu_to_all_gpus(index) if faiss_gpus() else index


def normalised(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def centred(x: np.ndarray, mean: np.ndarray, inplace: bool = False) -> np.ndarray:
    """(x - mean) / |x - mean| per row (float32; `inplace`: x itself when it is float32). Pooled post-ReLU features
    are all non-negative and share a large common component, so their raw cosines are all high; centred ones are
    spread over [-1, 1], and a cosine threshold then separates near-copies from neighbours."""
    x = x if inplace and x.dtype == np.float32 else np.array(x, np.float32)
    x -= np.asarray(mean, np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def _flat_kmeans(x: np.ndarray, k: int, niter: int, seed: int) -> np.ndarray:
    faiss = _faiss()
    if k >= len(x):  # as many centroids as points: the points themselves
        return x[:k].copy()
    cp = faiss.ClusteringParameters()
    cp.niter, cp.seed, cp.spherical = niter, seed, True
    cp.max_points_per_centroid = 1 << 30  # the caller sampled already
    cp.min_points_per_centroid = 1
    clustering = faiss.Clustering(x.shape[1], k, cp)
    clustering.train(x, flat_index(x.shape[1]))
    return normalised(faiss.vector_float_to_array(clustering.centroids).reshape(k, x.shape[1]))


def allocate(k: int, sizes: np.ndarray) -> np.ndarray:
    """k centroids shared among cells of `sizes` points in proportion (largest remainder), each non-empty cell
    at least one and none more than its points."""
    sizes = np.asarray(sizes, np.int64)
    share = k * sizes / max(1, sizes.sum())
    out = np.minimum(np.maximum(np.floor(share).astype(np.int64), (sizes > 0).astype(np.int64)), sizes)
    left = k - int(out.sum())
    if left > 0:
        room = sizes - out
        order = np.lexsort((np.arange(len(sizes)), -(share - np.floor(share))))
        order = order[room[order] > 0]
        while left > 0 and len(order):
            take = order[:left]
            out[take] += 1
            left -= len(take)
            order = order[(sizes - out)[order] > 0]
    return out


def kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0) -> np.ndarray:
    """About k spherical k-means centroids of the rows of `x` (fewer when x has fewer distinct points)."""
    x = normalised(x)
    k = max(1, min(k, len(x)))
    if k <= FLAT_MAX:
        return _flat_kmeans(x, k, niter, seed)
    coarse = _flat_kmeans(x, math.ceil(math.sqrt(k)), niter, seed)
    cell = Assigner(coarse)(x)[0]
    counts = allocate(k, np.bincount(cell, minlength=len(coarse)))
    order = np.argsort(cell, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(cell, minlength=len(coarse)))])
    parts = [_flat_kmeans(x[order[bounds[c]:bounds[c + 1]]], int(counts[c]), niter, seed + 1 + c)
             for c in range(len(coarse)) if counts[c]]
    return np.concatenate(parts)


class Assigner:
    """The nearest centroid (largest inner product) of each row: exact up to FLAT_MAX centroids, IVF above."""

    def __init__(self, centroids: np.ndarray, nprobe: int = NPROBE):
        faiss = _faiss()
        self.centroids = normalised(centroids)
        k, d = self.centroids.shape
        self.flat = flat_index(d)
        self.flat.add(self.centroids)
        self.exact = k <= FLAT_MAX
        self.index = self.flat
        if not self.exact:
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, math.ceil(math.sqrt(k)), faiss.METRIC_INNER_PRODUCT)
            self.index.cp.min_points_per_centroid = 1
            self.index.train(self.centroids)
            self.index.add(self.centroids)
            self.index.nprobe = nprobe

    def describe(self) -> str:
        where = f", {faiss_gpus()} GPU(s)" if faiss_gpus() else ""
        return ("exact" if self.exact else f"ivf: {self.index.nlist} lists, {self.index.nprobe} probed") + where

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(centroid index (int32), similarity) per row."""
        x = normalised(x)
        if not len(x):
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        sims, ids = self.index.search(x, 1)
        lost = ids[:, 0] < 0  # IVF: every probed list empty
        if lost.any():
            sims[lost], ids[lost] = self.flat.search(x[lost], 1)
        return ids[:, 0].astype(np.int32), sims[:, 0]
