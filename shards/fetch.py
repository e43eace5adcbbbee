"""Get one input's bytes from its locator (runs in the decode workers).

Locators (built by shards.discover):
  ("file", path)                       a local file
  ("url", url)                         any fsspec URL: s3://, http(s)://, ...
  ("tar", archive, offset, size)       a member of an uncompressed tar: one seek + read
  ("tarz", archive, member)            a member of a compressed tar (archive kept open per worker)
  ("parquet", table, row_group, row)   the `image` cell of a parquet table (row group cached per worker)
  ("bytes", data)                      already downloaded by the main process (shards.feed)
  ("failed", reason, detail)           a download that failed: its Reject
"""
from __future__ import annotations

import tarfile

from mocostream.pipeline.filesystems import Storage

from .validate import DOWNLOAD_FAILED, UNREADABLE, Reject, _short

_tars: dict[str, tarfile.TarFile] = {}
_row_group: dict = {"key": None, "images": []}


class FetchError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reject = Reject(reason, detail)


def _url(url: str, storage: Storage) -> bytes:
    try:
        return storage.read_bytes(url)
    except Exception as exc:  # 404, refused connection, access denied, ...
        raise FetchError(DOWNLOAD_FAILED, _short(exc)) from exc


def _tarz(archive: str, member: str) -> bytes:
    tf = _tars.get(archive)
    if tf is None:
        if len(_tars) >= 4:
            _tars.pop(next(iter(_tars))).close()
        tf = _tars[archive] = tarfile.open(archive, "r:*")
    f = tf.extractfile(member)
    return f.read() if f is not None else b""


def _parquet(storage: Storage, table: str, rg: int, row: int) -> bytes:
    import pyarrow.parquet as pq

    if _row_group["key"] != (table, rg):
        with storage.open(table, "rb") as f:
            _row_group["images"] = pq.ParquetFile(f).read_row_group(rg, columns=["image"]).column(0).to_pylist()
        _row_group["key"] = (table, rg)
    return _row_group["images"][row] or b""


def fetch(locator: tuple, storage: Storage) -> bytes:
    """The input's bytes; raises FetchError (carrying a Reject) when they cannot be read. `storage`: the run's
    (its timeouts and retries); a worker keeps the one it was given, so one client per process (a new S3
    session per file costs ~1 s)."""
    kind = locator[0]
    if kind == "bytes":
        return locator[1]
    if kind == "failed":
        raise FetchError(locator[1], locator[2])
    try:
        if kind == "file":
            with open(locator[1], "rb") as f:
                return f.read()
        if kind in ("url", "http"):
            return _url(locator[1], storage)
        if kind == "tar":
            with open(locator[1], "rb") as f:
                f.seek(locator[2])
                return f.read(locator[3])
        if kind == "tarz":
            return _tarz(locator[1], locator[2])
        if kind == "parquet":
            return _parquet(storage, *locator[1:])
    except FetchError:
        raise
    except Exception as exc:
        raise FetchError(UNREADABLE, _short(exc)) from exc
    raise ValueError(f"unknown locator {locator!r}")
