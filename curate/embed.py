"""Stage 1: every sample of the data through a frozen backbone, once, into DEST/embeddings/<stem>.parquet.

Shards are read whole as the trainer reads them (pipeline.storage.ShardReader: timeouts, retries, size and
sha256 checked against the manifest; pipeline.readers.read_samples: the same samples in the same order, so a
row's `member` is the index the trainer's stream uses). Images are decoded and transformed in worker processes
with the reference evaluation transform (resize to 256/224 of the side, centre crop: labeled_stream's
validation transform), normalised as for training, and the backbone's pooled features are L2-normalised and
stored as fp16. Under torchrun every rank takes every world-th shard. A shard's file is written atomically
when the shard is done and skipped by a rerun, so a killed job continues where it stopped and every sample is
embedded exactly once; an undecodable sample is skipped, counted by reason (the file's metadata) and logged.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from mocostream.pipeline.augment_reference import normalize
from mocostream.pipeline.filesystems import Storage
from mocostream.pipeline.labeled_stream import transform_chunk
from mocostream.pipeline.readers import read_samples
from mocostream.pipeline.shard_table import ShardTable, load_shard_table
from mocostream.pipeline.storage import ShardReader, ShardReadError, StorageObserver
from mocostream.pipeline.worker_pool import augmentation_pool, run_ahead

from .group import barrier, mine, on_rank0, rank_world
from .layout import EMBEDDINGS, INDEX, META, CurateError, Dest, Stems, embedding_name
from .tables import embedding_table, index_table, listing

log = logging.getLogger("mocostream.curate")

TRANSFORM = "resize to 256/224 of the side, centre crop (the reference evaluation transform)"


@dataclass
class EmbedConfig:
    data: str
    out: str
    image_size: int = 224
    batch_size: int = 256
    workers: int = 2  # decode processes (0: in this process)
    read_ahead: int = 2  # shards read ahead of the one being embedded


class EmbedObserver(StorageObserver):
    """What the embed job reports (the metrics endpoint, in ops); the default does nothing."""

    def started(self, shards: int, done: int) -> None: ...

    def embedded(self, images: int) -> None: ...

    def skipped(self, reason: str, n: int) -> None: ...

    def shard_done(self) -> None: ...


def absolute_spec(spec: str) -> str:
    """A data spec that still names the same data from another working directory."""
    def one(part: str) -> str:
        part = part.strip()
        return part if "://" in part or not part else os.path.abspath(part)

    return ",".join(one(p) for p in spec.split(","))


def embed(cfg: EmbedConfig, backbone: torch.nn.Module, info: dict, device: torch.device, *,
          storage: Storage, observer: EmbedObserver | None = None) -> dict:
    """Embed this rank's shards of `cfg.data` (skipping those already done); rank 0 then writes the index of
    every embedded shard. `backbone`: frozen, eval mode, on `device`; `info`: what it is (recorded, and a rerun
    with another backbone or data into the same DEST is refused). Returns this rank's counts."""
    observer = observer or EmbedObserver()
    if cfg.batch_size < 1 or cfg.image_size < 8 or cfg.workers < 0:
        raise CurateError("--batch-size must be >= 1, --image-size >= 8, --workers >= 0")
    table = load_shard_table(cfg.data, on_rank0, storage=storage)
    dest, stems = Dest(cfg.out, storage), Stems(table.names)
    meta = {"data": absolute_spec(cfg.data), "data_base": table.base, "data_shards": len(table), "data_fingerprint": table.fingerprint(),
            "backbone": {k: v for k, v in info.items() if k != "file"}, "backbone_file": info.get("file"),
            "image_size": cfg.image_size, "transform": TRANSFORM}
    on_rank0(lambda: _claim(dest, meta))
    done = on_rank0(lambda: listing(dest, EMBEDDINGS, ".parquet"))
    todo = [i for i in mine(len(table)) if embedding_name(stems[i]) not in done]
    observer.started(len(mine(len(table))), len(mine(len(table))) - len(todo))
    counts = _Embedder(cfg, backbone, device, table, stems, dest, storage, observer).run(todo)
    barrier()
    on_rank0(lambda: _write_index(dest, table, stems, meta))
    rank, world = rank_world()
    return {"rank": rank, "world": world, "shards": len(todo), **counts}


MOVABLE = ("data", "data_base", "backbone_file")  # where the data and the weights are may change between runs; not what


def _claim(dest: Dest, meta: dict) -> None:
    """DEST/embeddings/_meta.json: written by the first run, compared by every later one (the data by its
    shard-list fingerprint, the backbone by arch and sha256: either may have moved, and the new places are kept)."""
    old = dest.read_json(META) or meta
    changed = sorted(k for k in set(old) | set(meta) if k not in MOVABLE and old.get(k) != meta.get(k))
    if changed:
        raise CurateError(f"{dest.location(META)}: these embeddings were made with another {', '.join(changed)}; "
                          "use another --out, or remove its embeddings/ (and what was made from them)")
    if old is meta or any(old.get(k) != meta.get(k) for k in MOVABLE):
        dest.write_json(META, meta)


class _Embedder:
    """One rank's shards: read ahead on threads, decoded in worker processes, embedded here, one file each."""

    def __init__(self, cfg: EmbedConfig, backbone, device, table: ShardTable, stems: Stems, dest: Dest,
                 storage: Storage, observer: EmbedObserver):
        self.cfg, self.backbone, self.device, self.table, self.stems = cfg, backbone, device, table, stems
        self.dest, self.observer = dest, observer
        self.reader = ShardReader(storage, observer)
        self.counts: Counter = Counter()

    def run(self, todo: list[int]) -> dict:
        pool = augmentation_pool(self.cfg.workers) if self.cfg.workers else None
        t0, rows = time.perf_counter(), {}
        try:
            chunks = self._chunks(todo)
            for (i, members, keys, last, total), (images, reasons) in run_ahead(
                    pool, transform_chunk, chunks, max(2, 2 * self.cfg.workers)):
                rows.setdefault(i, []).append(self._rows(i, members, keys, images, reasons))
                if last:
                    n = self._write(i, rows.pop(i), total)
                    log.info("embedded shard %s: %d images (%.1f images/s on this rank)", self.stems.name(i), n,
                             self.counts["images"] / max(1e-9, time.perf_counter() - t0))
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        return dict(self.counts)

    def _shards(self, todo: list[int]) -> Iterator[tuple[int, list]]:
        """(shard index, its samples) in turn, `read_ahead` shards read ahead; an unreadable shard is logged,
        counted and left without a file (a rerun tries it again)."""
        with ThreadPoolExecutor(max(1, self.cfg.read_ahead), thread_name_prefix="embed-read") as pool:
            futures = [(i, pool.submit(self.reader.read, self.table[i])) for i in todo[: self.cfg.read_ahead]]
            for k, i in enumerate(todo):
                j = k + self.cfg.read_ahead
                if j < len(todo):
                    futures.append((todo[j], pool.submit(self.reader.read, self.table[todo[j]])))
                _, future = futures[k]
                try:
                    yield i, list(read_samples(self.table[i], future.result()))
                except ShardReadError as e:
                    log.error("shard unreadable, not embedded (a rerun tries it again): %s (%s)", self.table[i].url, e)
                    self.counts["shards_failed"] += 1
                futures[k] = (i, None)  # its bytes are no longer held

    def _chunks(self, todo: list[int]):
        """(tag, transform_chunk arguments) per batch of readable samples; the tag of a shard's last batch says
        so (an empty batch for a shard with nothing decodable)."""
        for i, samples in self._shards(todo):
            good = [(m, s) for m, s in enumerate(samples) if s.error is None]
            for m, s in enumerate(samples):
                if s.error is not None:
                    self._skip(i, s.error, s.key)
            starts = range(0, max(1, len(good)), self.cfg.batch_size)
            for start in starts:
                part = good[start:start + self.cfg.batch_size]
                tag = (i, [m for m, _ in part], [s.key for _, s in part], start == starts[-1], len(samples))
                yield tag, ([s.data for _, s in part], self.cfg.image_size, False, 0)

    def _skip(self, i: int, reason: str, key: str) -> None:
        self.counts[f"skipped_{reason}"] += 1
        self.observer.skipped(reason, 1)
        log.warning("sample not embedded (%s): %s in %s", reason, key, self.stems.name(i))

    @torch.inference_mode()
    def _rows(self, i: int, members: list[int], keys: list[str], images: np.ndarray, reasons: list):
        """(keys, members, fp16 vectors) of one batch's decodable samples."""
        for m, key, reason in zip(members, keys, reasons):
            if reason is not None:
                self._skip(i, reason, key)
        ok = [r is None for r in reasons]
        members = [m for m, k in zip(members, ok) if k]
        keys = [key for key, k in zip(keys, ok) if k]
        if not len(images):
            return keys, members, None
        x = normalize(images).to(self.device)
        vectors = F.normalize(self.backbone(x).float(), dim=1).half().cpu().numpy()
        self.counts["images"] += len(keys)
        self.observer.embedded(len(keys))
        return keys, members, vectors

    def _write(self, i: int, parts: list, samples: int) -> int:
        keys = [k for p in parts for k in p[0]]
        members = np.array([m for p in parts for m in p[1]], np.int32)
        vectors = [p[2] for p in parts if p[2] is not None]
        dim = vectors[0].shape[1] if vectors else 0
        vectors = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float16)
        skipped = samples - len(keys)
        self.dest.write_table(embedding_name(self.stems[i]), embedding_table(
            keys, self.stems.name(i), members, vectors, {"samples": samples, "skipped": skipped}))
        self.counts["shards_done"] += 1
        self.observer.shard_done()
        return len(keys)


def _write_index(dest: Dest, table: ShardTable, stems: Stems, meta: dict) -> None:
    """DEST/embeddings/_index.parquet: every embedded shard, its rows and samples (from the files' footers)."""
    index = index_table(dest, table, stems)
    dest.write_table(INDEX, index.replace_schema_metadata({"mocostream_curate": json.dumps(meta)}))
    missing = len(table) - index.num_rows
    if missing:
        log.error("%d of %d shards are not embedded (unreadable: see the log); run embed again to retry them",
                  missing, len(table))
