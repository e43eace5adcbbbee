"""The destination: a local folder or an fsspec URL (s3://bucket/prefix), written atomically.

No file ever appears under its final name half-written:
- local: build under a temp name in the destination folder, then `os.replace` (atomic on POSIX);
- remote: build in a local temp dir, then upload the finished file (an S3 object only becomes
  visible once its PUT / multipart upload completes).
Remote calls go through the run's `Storage` (pipeline.filesystems, the trainer's storage factory): the same
endpoint variables, timeouts and bounded retries as every other reader and writer.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, TypeVar

from fsspec.implementations.local import LocalFileSystem

from mocostream.pipeline.filesystems import Storage, StorageUnavailable

from .errors import ShardError

T = TypeVar("T")


class Destination:
    def __init__(self, url: str, create: bool = True, *, storage: Storage):
        self.url = url.rstrip("/") or url
        self.create, self.storage = create, storage
        try:
            self.fs, self.root = storage.filesystem(self.url)
        except (ImportError, ValueError) as exc:
            raise ShardError(f"unsupported destination {url}: {exc}") from exc
        self.local = isinstance(self.fs, LocalFileSystem)
        self._preflight()
        # Where files are built before they are published under their final name.
        self.staging = self.root if self.local or not create else tempfile.mkdtemp(prefix="mocostream-shards-")
        self._pending: set[str] = set()

    def _preflight(self) -> None:
        try:
            if self.local and not self.create:
                if not os.path.isdir(self.root):
                    raise ShardError(f"not found: {self.url}")
            elif self.local:
                os.makedirs(self.root, exist_ok=True)
                probe = os.path.join(self.root, f".write-probe-{os.getpid()}")
                with open(probe, "wb"):
                    pass
                os.remove(probe)
            else:
                self._check_bucket()
        except ShardError:
            raise
        except StorageUnavailable as exc:  # an endpoint that does not answer, after the retries
            raise ShardError(f"cannot use destination {self.url}: {exc}") from exc
        except Exception as exc:  # permissions, bad credentials, unreachable endpoint
            raise ShardError(f"cannot use destination {self.url}: {type(exc).__name__}: {exc}") from exc

    def _check_bucket(self) -> None:
        """A listing (not `exists`, which answers False to refused credentials too) tells a missing bucket
        from a wrong key or secret."""
        bucket = self.root.split("/", 1)[0]
        try:
            self.call(f"list {self.url}", lambda: self.fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1))
        except FileNotFoundError:
            raise ShardError(f"bucket not found: {bucket} (in {self.url})") from None
        except PermissionError as exc:
            raise ShardError(f"S3 refused access to {self.url}: {exc} (check AWS_ACCESS_KEY_ID and "
                             f"AWS_SECRET_ACCESS_KEY)") from None

    def call(self, what: str, call: Callable[[], T]) -> T:
        """One call on the destination's file system: on remote storage with its timeouts and retries."""
        return call() if self.local else self.storage.retrying(what, call)

    def remove_stale_temps(self) -> None:
        """Temp files of a killed earlier run (local only: remote temps live in a local temp dir)."""
        if self.local:
            for name in os.listdir(self.root):
                if name.startswith(".") and ".tmp-" in name:
                    try:
                        os.remove(os.path.join(self.root, name))
                    except FileNotFoundError:
                        pass

    def read(self, name: str) -> bytes | None:
        """A published file's bytes, or None when it does not exist."""
        try:
            return self.call(f"read {self.location(name)}", lambda: self.fs.cat_file(self.join(name)))
        except FileNotFoundError:
            return None

    def size(self, name: str) -> int | None:
        try:
            return int(self.call(f"read {self.location(name)}", lambda: self.fs.size(self.join(name))))
        except FileNotFoundError:
            return None

    def join(self, name: str) -> str:
        return f"{self.root}/{name}" if not self.local else os.path.join(self.root, name)

    def location(self, name: str) -> str:
        """User-facing URL of a published file."""
        return f"{self.url}/{name}"

    def staging_path(self, name: str) -> str:
        # Dot-prefixed temp name: never matches `<prefix>-NNNNNN.tar` globs, easy to spot if a run is killed.
        path = os.path.join(self.staging, f".{name}.tmp-{os.getpid()}")
        self._pending.add(path)
        return path

    def publish(self, staged: str, name: str) -> None:
        """Move a finished staged file to its final name."""
        if self.local:
            # fsync first: after a crash the final name must never point at missing data.
            with open(staged, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(staged, self.join(name))
        else:
            self.call(f"write {self.location(name)}", lambda: self.fs.put_file(staged, self.join(name)))
            os.remove(staged)
        self._pending.discard(staged)

    def write_bytes(self, name: str, data: bytes) -> None:
        staged = self.staging_path(name)
        with open(staged, "wb") as f:
            f.write(data)
        self.publish(staged, name)

    def close(self) -> None:
        """Remove leftovers of an interrupted run (only our own temp files)."""
        for path in list(self._pending):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        self._pending.clear()
        if not self.local and self.create:
            shutil.rmtree(self.staging, ignore_errors=True)
