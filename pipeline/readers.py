"""Shard bytes -> samples (key, image bytes), for webdataset tars and parquet files.

Damage inside a shard costs only the damaged samples: a truncated tar yields the samples before the cut,
an unreadable parquet row group is skipped; every loss is counted in `skipped` by reason.
"""
from __future__ import annotations

import io
import logging
from collections import Counter
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


def _image_of(sample: dict) -> bytes | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    return None


def _tar_samples(shard: Shard, data: bytes, skipped: Counter) -> Iterator[Sample]:
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
            skipped["no_image"] += 1
            log.warning("sample without an image skipped: %s in %s", sample["__key__"], shard.url)
            continue
        yield Sample(sample["__key__"], image)
    if errors:
        skipped["truncated_shard"] += 1
        log.warning("shard damaged, rest of it skipped: %s (%s)", shard.url, errors[0])


def _parquet_samples(shard: Shard, data: bytes, skipped: Counter) -> Iterator[Sample]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(io.BytesIO(data))
    except Exception as e:
        skipped["unreadable_shard"] += 1
        log.warning("unreadable parquet shard skipped: %s (%s)", shard.url, e)
        return
    row = 0
    for group in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(group, columns=["key", "image"])
        except Exception as e:
            n = pf.metadata.row_group(group).num_rows
            skipped["unreadable_row_group"] += n
            log.warning("unreadable row group %d (%d rows) skipped: %s (%s)", group, n, shard.url, e)
            row += n
            continue
        for key, image in zip(table.column("key").to_pylist(), table.column("image").to_pylist()):
            row += 1
            if not image:
                skipped["no_image"] += 1
                log.warning("row without an image skipped: %s in %s", key, shard.url)
                continue
            yield Sample(key if key else f"row{row - 1}", image)


def read_samples(shard: Shard, data: bytes, skipped: Counter) -> Iterator[Sample]:
    """The samples of one shard, in stored order."""
    if shard.format == "parquet":
        return _parquet_samples(shard, data, skipped)
    return _tar_samples(shard, data, skipped)
