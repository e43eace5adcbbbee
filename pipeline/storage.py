"""Reading whole shards from object storage, robustly: timeouts, bounded retries with exponential
backoff and jitter, content checks against the manifest, and events for the metrics.

Our retry loop is the only one (botocore's and s3fs's own are turned down to a single attempt), so
every retry is seen, counted and bounded. A shard that still fails is given up on: the stream skips
its samples, counts them and logs the URL; the epoch goes on.
"""
from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass

import fsspec

from . import sources
from .sources import DataSpecError, Shard, storage_options

log = logging.getLogger(__name__)


@dataclass
class StorageConfig:
    retries: int = 5  # attempts after the first
    backoff_seconds: float = 0.2  # first delay; doubles each retry, with +-50% jitter
    max_backoff_seconds: float = 10.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    verify_sha256: bool = True  # when the manifest gives one: catches truncated or altered bodies


class StorageObserver:
    """Receives storage events; the trainer forwards them to Prometheus. The default does nothing."""

    def read(self, nbytes: int, seconds: float) -> None: ...

    def retry(self) -> None: ...

    def failed(self) -> None: ...


class ShardReadError(IOError):
    pass


class StorageUnavailable(IOError):
    """Start-up could not reach the storage within --storage-timeout and --storage-retries; one line."""

    user_error = True


def backoff_delay(c: StorageConfig, attempt: int) -> float:
    return min(c.max_backoff_seconds, c.backoff_seconds * 2**attempt) * (0.5 + random.random())


def at_start(c: StorageConfig, allow_external: bool = False) -> None:
    """Give the S3 metadata calls (manifest, listing, sample counts, checkpoints) the shard reads' timeouts,
    with a single attempt each (the retries are `retrying`'s, bounded and logged), and set whether manifests
    may name shards outside their folder."""
    sources.S3_CLIENT_CONFIG.update(connect_timeout=min(c.connect_timeout, c.read_timeout),
                                    read_timeout=c.read_timeout, retries={"max_attempts": 1, "mode": "standard"})
    sources.ALLOW_EXTERNAL_SHARDS = allow_external


def retrying(c: StorageConfig, what: str, call):
    """call(), retried like a shard read; user errors and missing files are raised at once."""
    for attempt in range(c.retries + 1):
        try:
            return call()
        except (FileNotFoundError, DataSpecError):
            raise
        except Exception as e:
            if getattr(e, "user_error", False) or isinstance(e, (ValueError, TypeError)):
                raise  # a bad spec or option: retrying cannot fix it
            if attempt == c.retries:
                raise StorageUnavailable(f"cannot read {what}: {type(e).__name__}: {str(e)[:200]} (after {attempt} "
                                         f"retries, --storage-timeout {c.read_timeout:g} s)") from None
            delay = backoff_delay(c, attempt)
            log.warning("reading %s failed (%s: %s); retry %d/%d in %.2fs", what, type(e).__name__, e,
                        attempt + 1, c.retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class ShardReader:
    def __init__(self, config: StorageConfig | None = None, observer: StorageObserver | None = None):
        self.config = config or StorageConfig()
        self.observer = observer or StorageObserver()
        self._filesystems: dict[str, fsspec.AbstractFileSystem] = {}

    def _fs(self, url: str):
        protocol = url.split("://")[0] if "://" in url else "file"
        if protocol not in self._filesystems:
            options = storage_options(url)
            if protocol == "s3":
                c = self.config
                options["config_kwargs"] = {"connect_timeout": c.connect_timeout, "read_timeout": c.read_timeout,
                                            "retries": {"max_attempts": 1, "mode": "standard"}}
                options["skip_instance_cache"] = True  # our own instance: its retry setting is ours alone
            fs = fsspec.filesystem(protocol, **options)
            if protocol == "s3":
                fs.retries = 1
            self._filesystems[protocol] = fs
        return self._filesystems[protocol]

    def read(self, shard: Shard) -> bytes:
        """The shard's bytes, or ShardReadError after the last retry."""
        c = self.config
        fs = self._fs(shard.url)
        path = fsspec.core.strip_protocol(shard.url)
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
