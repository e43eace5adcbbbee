"""`--materialise`: the kept samples as a shard set of their own (DEST/shards), for a standalone copy.

The selection is read as the trainer reads it (pipeline.selection: the data's shards, the kept members of each);
each data shard's kept samples go to a staging parquet table (image bytes plus `source_key` and `source_shard`,
which travel into the new samples' metadata), and the shard tool (`shards create`, dedup off) turns the tables
into validated shards with manifest, stats and rejects as for any other input. Staging tables are written
atomically and skipped by a rerun, and `shards create` continues a killed run by itself; the staging folder is
removed at the end. Sample keys are the shard tool's (`<table>_<row>`); labels are not carried over.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq

from mocostream.pipeline.filesystems import Storage
from mocostream.pipeline.readers import read_samples
from mocostream.pipeline.selection import load_table
from mocostream.pipeline.storage import ShardReader, ShardReadError

from .layout import Dest

log = logging.getLogger("mocostream.curate")


def materialise(out: str, fmt: str = "tar", samples_per_shard: int = 1000, workers: int = 1, *,
                storage: Storage) -> dict:
    """Write DEST/shards from the selection in DEST; returns the shard tool's summary."""
    from mocostream.shards import create_shards

    dest = Dest(out, storage)
    table = load_table(out, storage=storage)
    work = os.path.join(dest.local_folder(), ".materialise-work") if dest.local_folder() else \
        tempfile.mkdtemp(prefix="mocostream-materialise-")
    os.makedirs(work, exist_ok=True)
    reader = ShardReader(storage)
    sources = []
    for i in range(len(table)):
        path = os.path.join(work, f"{i:09d}.parquet")
        sources.append(path)
        if not os.path.exists(path):
            _stage(table, i, reader, storage, path)
    report = create_shards(sources, dest.location("shards"), fmt=fmt, samples_per_shard=samples_per_shard,
                           dedup="none", workers=workers, progress=False, storage=storage)
    shutil.rmtree(work, ignore_errors=True)
    return {"shards": len(report.shards), "written": report.written, "rejected": len(report.rejected),
            "manifest": report.manifest_url}


def _stage(table, i: int, reader: ShardReader, storage: Storage, path: str) -> None:
    """The kept samples of the table's shard i as a parquet table of image bytes (written atomically)."""
    shard = table[i]
    try:
        samples = table.kept.select(i, list(read_samples(shard, reader.read(shard))), storage)
    except (ShardReadError, OSError) as e:
        log.error("shard unreadable, its kept samples not materialised: %s (%s)", shard.url, e)
        samples = []
    samples = [s for s in samples if s.error is None]
    staged = pa.table({"image": pa.array([s.data for s in samples], pa.binary()),
                       "source_key": pa.array([s.key for s in samples], pa.string()),
                       "source_shard": pa.array([shard.url] * len(samples), pa.string())})
    buffer = io.BytesIO()
    pq.write_table(staged, buffer, row_group_size=256)
    with open(path + ".tmp", "wb") as f:
        f.write(buffer.getvalue())
    os.replace(path + ".tmp", path)
