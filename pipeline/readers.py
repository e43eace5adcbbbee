"""Shard bytes -> samples (key, image bytes), for webdataset tars and parquet files.

Damage inside a shard costs only the damaged samples: a truncated tar yields the samples before the cut,
an unreadable parquet row group or a sample without an image becomes a `Sample` with `error` set, so
positions still match the manifest and the stream counts each loss by reason.
"""
from __future__ import annotations

import io
import logging
import re
import tarfile
from dataclasses import dataclass
from typing import Iterator

from webdataset.tariterators import group_by_keys

from .shard import Shard

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


# Shards are plain tar (as `shards create` writes them and DALI reads them): a compressed `.tar` is refused,
# so a small shard can never expand to gigabytes in memory; and no single member may exceed this.
MAX_MEMBER_BYTES = 64 << 20
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
META_MEMBER = re.compile(r"__[^/]*__($|/)")  # __MACOSX/ and the like, as webdataset skips them


def _compression(data: bytes) -> str | None:
    return next((name for magic, name in COMPRESSED_MAGIC.items() if data.startswith(magic)), None)


def _tar_members(shard: Shard, data: bytes, errors: list, oversized: set) -> Iterator[dict]:
    """Regular members as webdataset file dicts; an oversized one yields empty data and its key is noted.
    tarfile raises from the member iteration itself on a cut-off archive: stop there, keep the rest."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as stream:
            for info in stream:
                if not info.isreg() or META_MEMBER.search(info.name):
                    continue
                if info.size > MAX_MEMBER_BYTES:
                    oversized.add(_key_of(info.name))
                    log.warning("member of %d bytes skipped (over %d): %s in %s", info.size, MAX_MEMBER_BYTES,
                                info.name, shard.url)
                    yield {"fname": info.name, "data": b"", "__url__": shard.url}
                    continue
                yield {"fname": info.name, "data": stream.extractfile(info).read(), "__url__": shard.url}
    except Exception as exn:
        errors.append(exn)


def _key_of(name: str) -> str:
    """The webdataset key of a member name: the path up to the first dot of its last component."""
    folder, _, base = name.rpartition("/")
    return (folder + "/" if folder else "") + base.split(".", 1)[0]


def _tar_samples(shard: Shard, data: bytes) -> Iterator[Sample]:
    compression = _compression(data)
    if compression:
        log.warning("%s-compressed tar shard skipped (shards are plain tar): %s", compression, shard.url)
        return
    errors: list[Exception] = []
    oversized: set[str] = set()

    def note(exn: Exception) -> bool:  # webdataset error handler: remember and stop this shard
        errors.append(exn)
        return False

    # Metadata members (`.json`, `.cls`) are never unpickled: only raw bytes are kept.
    for sample in group_by_keys(_tar_members(shard, data, errors, oversized), handler=note):
        key = sample["__key__"]
        if key in oversized:
            yield Sample(key, b"", "too_large")
            continue
        image = _image_of(sample)
        if image is None:
            log.warning("sample without an image skipped: %s in %s", key, shard.url)
            yield Sample(key, b"", "no_image")
            continue
        yield Sample(key, image)
    if errors:
        log.warning("shard damaged, rest of it skipped: %s (%s)", shard.url, errors[0])


def _parquet_samples(shard: Shard, data: bytes) -> Iterator[Sample]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(io.BytesIO(data))
        columns = [c for c in ("key", "image") if c in pf.schema_arrow.names]
    except Exception as e:
        log.warning("unreadable parquet shard skipped: %s (%s)", shard.url, e)
        return
    if "image" not in columns:
        log.warning("parquet shard without an 'image' column, its rows skipped: %s", shard.url)
    # Rows without a key (no column, or empty) are named after the shard, so keys stay unique across shards.
    stem = shard.url.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    row = 0
    for group in range(pf.num_row_groups):
        n = pf.metadata.row_group(group).num_rows
        try:
            table = pf.read_row_group(group, columns=columns)
            keys = table.column("key").to_pylist() if "key" in columns else [None] * n
            images = table.column("image").to_pylist() if "image" in columns else [None] * n
        except Exception as e:
            log.warning("unreadable row group %d (%d rows) skipped: %s (%s)", group, n, shard.url, e)
            for _ in range(n):
                yield Sample(f"{stem}-row{row}", b"", "unreadable_row_group")
                row += 1
            continue
        for key, image in zip(keys, images):
            key = str(key) if key not in (None, "") else f"{stem}-row{row}"
            row += 1
            if not image or not isinstance(image, bytes):
                log.warning("row without an image skipped: %s in %s", key, shard.url)
                yield Sample(key, b"", "no_image")
                continue
            yield Sample(key, image)


def read_samples(shard: Shard, data: bytes) -> Iterator[Sample]:
    """The samples of one shard, in stored order (a damaged tar ends early)."""
    if shard.format == "parquet":
        return _parquet_samples(shard, data)
    return _tar_samples(shard, data)
