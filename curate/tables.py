"""The embeddings files: one parquet table per data shard, and the index of them all.

    key     string                       the sample's key, as the trainer's stream names it
    shard   string                       the shard, as the data's shard list names it
    member  int32                        the sample's index within its shard, in the order the pipeline reads it
    vector  fixed_size_list<float16>[D]  L2-normalised backbone features

Its key-value metadata `mocostream_embed`: {"samples": samples read from the shard, "skipped": those not
embedded (undecodable)}. The index (`_index.parquet`): shard (index in the data's list), name, stem, rows,
samples, skipped; built from the files' footers, so it never needs a vector.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .layout import INDEX, CurateError, Dest, Stems, embedding_name

META_KEY = b"mocostream_embed"


def embedding_table(keys: list[str], shard: str, members: np.ndarray, vectors: np.ndarray, meta: dict) -> pa.Table:
    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, np.float16).reshape(-1), pa.float16())
    table = pa.table({"key": pa.array(keys, pa.string()), "shard": pa.array([shard] * len(keys), pa.string()),
                      "member": pa.array(members, pa.int32()),
                      "vector": pa.FixedSizeListArray.from_arrays(flat, dim)})
    return table.replace_schema_metadata({META_KEY: json.dumps(meta)})


def vectors_of(table: pa.Table) -> np.ndarray:
    """(n, D) float16 of a `vector` column, without a copy per row."""
    column = table.column("vector").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float16, copy=False).reshape(-1, dim)


def read_embeddings(dest: Dest, stem: str, columns=("key", "member", "vector")) -> pa.Table:
    return dest.read_table(embedding_name(stem), columns=list(columns))


def listing(dest: Dest, folder: str, suffix: str) -> set[str]:
    """Names (relative to DEST) of the files under `folder` ending in `suffix`: one recursive listing."""
    path = f"{dest.root}/{folder}"
    try:
        found = dest._call(f"list {dest.location(folder)}", lambda: dest.fs.find(path))
    except FileNotFoundError:
        return set()
    prefix = dest.root.rstrip("/") + "/"
    return {p[len(prefix):] for p in found if p.endswith(suffix) and p.startswith(prefix)}


def _footer(dest: Dest, stem: str) -> tuple[int, dict]:
    raw = dest.read_bytes(embedding_name(stem))  # small files (a shard's vectors): one read each
    meta = pq.read_metadata(pa.BufferReader(raw))
    return meta.num_rows, json.loads((meta.metadata or {}).get(META_KEY, b"{}"))


def index_table(dest: Dest, table, stems: Stems) -> pa.Table:
    """One row per data shard with an embeddings file, in data order."""
    from .layout import EMBEDDINGS

    present = listing(dest, EMBEDDINGS, ".parquet")
    shards = [i for i in range(len(table)) if embedding_name(stems[i]) in present]
    with ThreadPoolExecutor(16, thread_name_prefix="embed-index") as pool:
        footers = list(pool.map(lambda i: _footer(dest, stems[i]), shards))
    return pa.table({
        "shard": pa.array(shards, pa.int64()),
        "name": pa.array([stems.name(i) for i in shards], pa.string()),
        "stem": pa.array([stems[i] for i in shards], pa.string()),
        "rows": pa.array([rows for rows, _ in footers], pa.int64()),
        "samples": pa.array([m.get("samples", rows) for rows, m in footers], pa.int64()),
        "skipped": pa.array([m.get("skipped", 0) for _, m in footers], pa.int64()),
    })


def read_index(dest: Dest) -> tuple[pa.Table, dict]:
    """(the index, the embeddings' _meta) of a DEST whose embed stage finished."""
    raw = dest.read_bytes(INDEX)
    if raw is None:
        raise CurateError(f"{dest.location(INDEX)} not found: run `mocostream curate embed` into {dest.url} first")
    index = pq.read_table(pa.BufferReader(raw))
    meta = json.loads((index.schema.metadata or {}).get(b"mocostream_curate", b"{}"))
    if not index.num_rows or not int(pc.sum(index.column("rows")).as_py() or 0):
        raise CurateError(f"{dest.url}: no sample was embedded")
    return index, meta
