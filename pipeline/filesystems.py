"""The one storage factory: every reader and writer (the trainer's stream and start-up, eval, export,
checkpoints, `--init-from` weights, the shard tool) gets its fsspec filesystems from a `Storage`, built from
a StorageConfig and passed down, so all use the same timeouts, retries, S3 endpoint and external-shard policy.

S3: the endpoint comes from AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL (keys and region as botocore reads
them); every call has the connect and read timeouts, and writes are bounded too: no `Expect: 100-continue`
(aiohttp would await its answer without a timeout), and on Linux an upload whose data stays unacknowledged
for the read timeout is aborted (TCP_USER_TIMEOUT). botocore and s3fs make one attempt per call, so
`Storage.retrying` (exponential backoff with jitter) is the only retry loop: every retry is logged and
bounded. Streamed reads (`Storage.open`), which cannot be restarted from outside, get s3fs's own retries,
as many as the config allows. Depends on fsspec and the standard library only (for S3, on what s3fs
brings): `shards` uses it too.
"""
from __future__ import annotations

import functools
import logging
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar

import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")
S3 = ("s3", "s3a")


@dataclass(frozen=True)
class StorageConfig:
    retries: int = 5  # attempts after the first
    backoff_seconds: float = 0.2  # first delay; doubles each retry, with +-50% jitter
    max_backoff_seconds: float = 10.0
    connect_timeout: float = 10.0  # at most read_timeout
    read_timeout: float = 60.0
    verify_sha256: bool = True  # when the manifest gives one: catches truncated or altered bodies
    allow_external_shards: bool = False  # may a manifest name shards outside its own folder?


class StorageUnavailable(IOError):
    """Storage did not answer within --storage-timeout after --storage-retries retries; one line."""

    user_error = True


def backoff_delay(c: StorageConfig, attempt: int) -> float:
    return min(c.max_backoff_seconds, c.backoff_seconds * 2**attempt) * (0.5 + random.random())


def is_permanent(e: Exception) -> bool:
    """Errors that retrying cannot fix: a missing file (or a folder where a file should be), refused
    credentials, a bad spec or option."""
    return (isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError,
                           TypeError))
            or getattr(e, "user_error", False))


class Storage:
    """fsspec filesystems with one StorageConfig's settings, cached per protocol (and per process: a forked
    child makes its own). `environ`: where the AWS_* variables come from (default: this process's
    environment; given, its keys are passed on too). Pickles as its settings."""

    def __init__(self, config: StorageConfig | None = None, environ: Mapping[str, str] | None = None):
        self.config = config or StorageConfig()
        self.environ = None if environ is None else dict(environ)
        self._filesystems: dict[tuple[str, bool], fsspec.AbstractFileSystem] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {"config": self.config, "environ": self.environ}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"], state["environ"])

    @property
    def allow_external_shards(self) -> bool:
        return self.config.allow_external_shards

    def options(self, url: str) -> dict:
        """fsspec options for `url`'s protocol: for S3 the endpoint, the timeouts and one botocore attempt
        (an own instance, not s3fs's shared cache, so these settings are this Storage's alone)."""
        if protocol_of(url) not in S3:
            return {}
        c, env = self.config, os.environ if self.environ is None else self.environ
        options: dict = {"skip_instance_cache": True, "session": _s3_session(), "config_kwargs": {
            "connect_timeout": min(c.connect_timeout, c.read_timeout), "read_timeout": c.read_timeout,
            "retries": {"total_max_attempts": 1, "mode": "standard"}}}
        if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
            factory = functools.partial(_stall_bounded_socket, round(c.read_timeout * 1000))
            options["config_kwargs"]["connector_args"] = {"socket_factory": factory}
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        if self.environ is not None and env.get("AWS_ACCESS_KEY_ID"):
            options.update(key=env["AWS_ACCESS_KEY_ID"], secret=env.get("AWS_SECRET_ACCESS_KEY"))
        return options

    def filesystem(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """(fs, path) for a local path or URL; each call on `fs` is one attempt (see `retrying`)."""
        fs = self._filesystem(url, streamed=False)
        return fs, fsspec.core.strip_protocol(url)

    def open(self, url: str, mode: str = "rb", **kwargs):
        """An open file for streamed reading (e.g. `compression=`); s3fs retries its failed requests."""
        fs = self._filesystem(url, streamed=True)
        return fsspec.core.OpenFile(fs, fsspec.core.strip_protocol(url), mode, **kwargs).open()

    def _filesystem(self, url: str, streamed: bool) -> fsspec.AbstractFileSystem:
        protocol = protocol_of(url)
        key = (protocol, streamed and protocol in S3)
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's clients belong to its event loop
                self._filesystems, self._pid = {}, os.getpid()
            fs = self._filesystems.get(key)
            if fs is None:
                fs = fsspec.filesystem(protocol, **self.options(url))
                if protocol in S3:  # s3fs's own retry loop: off, or the streamed reads' only one
                    fs.retries = self.config.retries + 1 if streamed else 1
                self._filesystems[key] = fs
        return fs

    def retrying(self, what: str, call: Callable[[], T]) -> T:
        """call(), retried with backoff on storage errors; `what` says what it does ("read s3://b/x"), for
        the log lines and the error. Permanent errors (is_permanent) are raised at once."""
        c = self.config
        for attempt in range(c.retries + 1):
            try:
                return call()
            except Exception as e:
                if is_permanent(e):
                    raise
                if attempt == c.retries:
                    raise StorageUnavailable(f"cannot {what}: {type(e).__name__}: {str(e)[:200]} (after {attempt} "
                                             f"retries, --storage-timeout {c.read_timeout:g} s)") from None
                delay = backoff_delay(c, attempt)
                log.warning("cannot %s (%s: %s); retry %d/%d in %.2fs", what, type(e).__name__, e,
                            attempt + 1, c.retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def read_bytes(self, url: str) -> bytes:
        """A whole file's bytes; from remote storage retried (FileNotFoundError at once)."""
        fs, path = self.filesystem(url)
        return self.retrying(f"read {url}", lambda: fs.cat_file(path)) if is_remote(url) else fs.cat_file(path)

    def write_bytes(self, url: str, data: bytes) -> None:
        """A whole object written in one PUT (it appears complete or not at all), retried."""
        fs, path = self.filesystem(url)
        self.retrying(f"write {url}", lambda: fs.pipe_file(path, data))


def _s3_session():
    """An aiobotocore session whose S3 clients send no `Expect: 100-continue`: aiohttp waits for the `100`
    before it starts the read timeout, so a write to an endpoint that never answers would wait forever."""
    import aiobotocore.session
    from botocore.handlers import add_expect_header

    session = aiobotocore.session.AioSession()
    session.unregister("before-call.s3", add_expect_header)
    return session


def _stall_bounded_socket(timeout_ms: int, addr_info) -> socket.socket:
    """A client socket whose sent data may stay unacknowledged at most `timeout_ms` (TCP_USER_TIMEOUT): the
    read timeout only starts once a request body is sent, so an upload to a peer that stopped reading would
    otherwise wait forever."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, timeout_ms)
    return sock


def protocol_of(url: str) -> str:
    return fsspec.core.split_protocol(url)[0] or "file"


def is_remote(url: str) -> bool:
    return protocol_of(url) != "file"
