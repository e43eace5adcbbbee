"""Semantic near-duplicates within one cluster (SemDeDup, Abbas et al. 2023), decided greedily in a fixed order.

The vectors are the members' embeddings centred on the fit sample's mean and re-normalised (select.py): raw
ReLU features are all alike (cosine ~0.96 between unrelated images), centred ones only when the images are.
Members are visited in the order given (the caller's: data order, so the first copy in the data is the one
kept); a member whose cosine similarity to an already kept member exceeds `threshold` (1 - --dedup-eps) is a
duplicate of the most similar such member, otherwise it is kept. Earlier kept members are searched with a flat
inner-product index (faiss); within a chunk of CHUNK members the decisions are made against the chunk's own
similarity matrix, visiting only the members that have an earlier candidate above the threshold. Cost about
m x kept x D per cluster of m members; memory CHUNK^2 floats besides the cluster's vectors.
"""
from __future__ import annotations

import numpy as np

CHUNK = 1024


def greedy_dedup(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """dup_of[j]: -1 when member j is kept, else the index of the kept member it duplicates."""
    import faiss

    x = np.ascontiguousarray(vectors, np.float32)
    m = len(x)
    dup_of = np.full(m, -1, np.int64)
    if m < 2:
        return dup_of
    index, kept = faiss.IndexFlatIP(x.shape[1]), []  # the kept members so far, and their positions
    for start in range(0, m, CHUNK):
        chunk = x[start:start + CHUNK]
        best_sim = np.full(len(chunk), -np.inf, np.float32)
        best = np.full(len(chunk), -1, np.int64)
        if index.ntotal:
            sims, ids = index.search(chunk, 1)
            hit = sims[:, 0] > threshold
            best_sim[hit], best[hit] = sims[hit, 0], np.asarray(kept, np.int64)[ids[hit, 0]]
        sim = chunk @ chunk.T
        earlier = np.triu(sim > threshold, k=1)  # earlier[i, j]: i < j and close enough
        alive = np.ones(len(chunk), bool)
        for j in np.flatnonzero(earlier.any(axis=0) | (best >= 0)):
            rivals = np.flatnonzero(earlier[:j, j] & alive[:j])
            if len(rivals):
                i = rivals[np.argmax(sim[rivals, j])]
                if sim[i, j] > best_sim[j]:
                    best_sim[j], best[j] = sim[i, j], start + i
            if best[j] >= 0:
                alive[j] = False
                dup_of[start + j] = best[j]
        index.add(chunk[alive])
        kept.extend((start + np.flatnonzero(alive)).tolist())
    return dup_of
