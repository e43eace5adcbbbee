"""The destination: a local folder or an fsspec URL (s3://bucket/prefix), written atomically.

No file ever appears under its final name half-written:
- local: build under a temp name in the destination folder, then `os.replace` (atomic on POSIX);
- remote: build in a local temp dir, then upload the finished file (an S3 object only becomes
  visible once its PUT / multipart upload completes).
"""
from __future__ import annotations

import os
import shutil
import tempfile

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import ShardError


def storage_options(url: str) -> dict:
    """fsspec options for `url`. For s3, endpoint and keys come from the standard AWS_* variables.

    botocore itself reads AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; we also
    pass the endpoint explicitly and skip s3fs's instance cache, so a changed environment
    (another endpoint in the same process) is never served by a stale cached filesystem.
    """
    if not url.startswith(("s3://", "s3a://")):
        return {}
    opts: dict = {"skip_instance_cache": True}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    # An endpoint that accepts connections and never answers must not hang the run: every S3 call has a
    # timeout (MOCOSTREAM_STORAGE_TIMEOUT seconds, as the trainer's --storage-timeout; default 60).
    timeout = storage_timeout()
    opts["config_kwargs"] = {"connect_timeout": min(10.0, timeout), "read_timeout": timeout,
                             "retries": {"max_attempts": 3, "mode": "standard"}}
    return opts


def storage_timeout() -> float:
    raw = os.environ.get("MOCOSTREAM_STORAGE_TIMEOUT", "60")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ShardError(f"MOCOSTREAM_STORAGE_TIMEOUT must be a number of seconds > 0, got {raw!r}")
    return value


class Destination:
    def __init__(self, url: str, create: bool = True):
        self.url = url.rstrip("/") or url
        self.create = create
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options(self.url))
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
        except Exception as exc:  # permissions, bad credentials, unreachable endpoint
            raise ShardError(f"cannot use destination {self.url}: {type(exc).__name__}: {exc}") from exc

    def _check_bucket(self) -> None:
        """A listing (not `exists`, which answers False to refused credentials too) tells a missing bucket
        from a wrong key or secret."""
        bucket = self.root.split("/", 1)[0]
        retries, self.fs.retries = self.fs.retries, 1  # at start botocore's bounded retries are enough
        try:
            self.fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)
        except FileNotFoundError:
            raise ShardError(f"bucket not found: {bucket} (in {self.url})") from None
        except PermissionError as exc:
            raise ShardError(f"S3 refused access to {self.url}: {exc} (check AWS_ACCESS_KEY_ID and "
                             f"AWS_SECRET_ACCESS_KEY)") from None
        finally:
            self.fs.retries = retries

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
            return self.fs.cat_file(self.join(name))
        except FileNotFoundError:
            return None

    def size(self, name: str) -> int | None:
        try:
            return int(self.fs.size(self.join(name)))
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
            self.fs.put_file(staged, self.join(name))
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
