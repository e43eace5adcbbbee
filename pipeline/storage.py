"""Reading whole shards from object storage, robustly: timeouts, bounded retries with exponential
backoff and jitter, content checks against the manifest, and events for the metrics.

Our retry loop is the only one (the storage factory, filesystems.py, turns botocore's and s3fs's own
down to a single attempt), so every retry is seen, counted and bounded. A shard that still fails is given
up on: the stream skips its samples, counts them and logs the URL; the epoch goes on.
"""
from __future__ import annotations

import hashlib
import logging
import time

from .filesystems import Storage, StorageConfig, StorageUnavailable, backoff_delay
from .sources import Shard

log = logging.getLogger(__name__)

__all__ = ["ShardReader", "ShardReadError", "Storage", "StorageConfig", "StorageObserver", "StorageUnavailable"]


class StorageObserver:
    """Receives storage events; the trainer forwards them to Prometheus. The default does nothing."""

    def read(self, nbytes: int, seconds: float) -> None: ...

    def retry(self) -> None: ...

    def failed(self) -> None: ...


class ShardReadError(IOError):
    pass


class ShardReader:
    """Whole shards through `storage` (its filesystems, timeouts and retries), checked against the manifest."""

    def __init__(self, storage: Storage, observer: StorageObserver | None = None):
        self.storage, self.config = storage, storage.config
        self.observer = observer or StorageObserver()

    def read(self, shard: Shard) -> bytes:
        """The shard's bytes, or ShardReadError after the last retry."""
        c = self.config
        fs, path = self.storage.filesystem(shard.url)
        for attempt in range(c.retries + 1):
            t0 = time.perf_counter()
            try:
                data = fs.cat_file(path)
                seconds = time.perf_counter() - t0
                if shard.bytes is not None and len(data) != shard.bytes:
                    raise ShardReadError(f"read {len(data)} bytes, manifest says {shard.bytes}")
                if c.verify_sha256 and shard.sha256 and hashlib.sha256(data).hexdigest() != shard.sha256:
                    raise ShardReadError("sha256 differs from the manifest")
                self.observer.read(len(data), seconds)
                return data
            except FileNotFoundError as e:  # permanent: retrying will not make it appear
                self.observer.failed()
                raise ShardReadError(f"not found: {shard.url}") from e
            except Exception as e:
                if attempt == c.retries:
                    self.observer.failed()
                    raise ShardReadError(f"{shard.url}: {type(e).__name__}: {e} (after {attempt} retries)") from e
                delay = backoff_delay(c, attempt)
                self.observer.retry()
                log.warning("read of %s failed (%s: %s); retry %d/%d in %.2fs",
                            shard.url, type(e).__name__, e, attempt + 1, c.retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")
