"""Shard bytes -> samples (key, image bytes), for webdataset tars and parquet files.

Damage inside a shard costs only the damaged samples: a truncated tar yields the samples before the cut,
an unreadable parquet row group or a sample without an image becomes a `Sample` with `error` set, so
positions still match the manifest and the stream counts each loss by reason.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Iterator

from webdataset.tariterators import group_by_keys, tar_file_iterator

from .sources import Shard

log = logging.getLogger(__name__)

# In order of preference when a sample carries several images.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


@dataclass(frozen=True)
class Sample:
    key: str
    data: bytes
    error: str | None = None  # why this stored sample is unusable; kept so positions match the manifest


def _image_of(sample: dict) -> bytes | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    return None


def _tar_samples(shard: Shard, data: bytes) -> Iterator[Sample]:
    errors: list[Exception] = []

    def note(exn: Exception) -> bool:  # webdataset error handler: remember and stop this shard
        errors.append(exn)
        return False

    def files():
        # tarfile raises from the member iteration itself on a cut-off archive: stop there, keep the rest.
        try:
            for f in tar_file_iterator(io.BytesIO(data), handler=note):
                yield {**f, "__url__": shard.url}
        except Exception as exn:
            errors.append(exn)

    # Metadata members (`.json`, `.cls`) are never unpickled: only raw bytes are kept.
    for sample in group_by_keys(files(), handler=note):
        image = _image_of(sample)
        if image is None:
            log.warning("sample without an image skipped: %s in %s", sample["__key__"], shard.url)
            yield Sample(sample["__key__"], b"", "no_image")
            continue
        yield Sample(sample["__key__"], image)
    if errors:
        log.warning("shard damaged, rest of it skipped: %s (%s)", shard.url, errors[0])


def _parquet_samples(shard: Shard, data: bytes) -> Iterator[Sample]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(io.BytesIO(data))
    except Exception as e:
        log.warning("unreadable parquet shard skipped: %s (%s)", shard.url, e)
        return
    row = 0
    for group in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(group, columns=["key", "image"])
        except Exception as e:
            n = pf.metadata.row_group(group).num_rows
            log.warning("unreadable row group %d (%d rows) skipped: %s (%s)", group, n, shard.url, e)
            for _ in range(n):
                yield Sample(f"row{row}", b"", "unreadable_row_group")
                row += 1
            continue
        for key, image in zip(table.column("key").to_pylist(), table.column("image").to_pylist()):
            row += 1
            if not image:
                log.warning("row without an image skipped: %s in %s", key, shard.url)
                yield Sample(key or f"row{row - 1}", b"", "no_image")
                continue
            yield Sample(key if key else f"row{row - 1}", image)


def read_samples(shard: Shard, data: bytes) -> Iterator[Sample]:
    """The samples of one shard, in stored order (a damaged tar ends early)."""
    if shard.format == "parquet":
        return _parquet_samples(shard, data)
    return _tar_samples(shard, data)
