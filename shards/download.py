"""The download stage: many HTTP(S) requests in flight, politely, off the decode workers.

Why asyncio + aiohttp (not threads): one event-loop thread in the main process holds hundreds of
requests for the CPU of one, where a thread per request costs a stack and GIL hand-offs per chunk
(on 2 cores the main process also writes every shard); aiohttp's connector gives the per-host connection
limit and the connect/read timeouts built in, and its HTTP parser is C. aiohttp is already installed
through s3fs. The decode workers keep their isolation: they get the bytes, never a socket.

Per URL: connect and read timeouts; up to `retries` more tries with exponential backoff and jitter on
connection errors, timeouts, 408, 429 and 5xx (honouring `Retry-After`, capped), never on other 4xx or DNS
failures; a User-Agent naming the tool, its version and the user's token; `X-Robots-Tag` noai / noimageai /
noindex / noimageindex (for every robot, or for ours) means the image is not written; bodies over
`max_bytes` are cut off. Every failure gets a reason a person can act on (see REASONS).
"""
from __future__ import annotations

import asyncio
import collections
import email.utils
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from importlib import metadata

import aiohttp

from .options import byte_size, option
from .validate import CONNECTION, DNS, HTTP_ERROR, OPTED_OUT, TIMEOUT, TOO_LARGE

OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524})


def retryable(reason: str, status: int | None) -> bool:
    """Worth another try later (a host that was down, throttling), as opposed to a final answer."""
    return reason in (TIMEOUT, CONNECTION, DNS) or (reason == HTTP_ERROR and (status in RETRY_STATUS
                                                                              or (status or 0) >= 500))


def tool_version() -> str:
    try:
        return metadata.version("mocostream")
    except metadata.PackageNotFoundError:
        return "dev"


def user_agent(token: str = "") -> str:
    return f"mocostream/{tool_version()} (image dataset tool; +x-robots-tag noai respected" + (
        f"; {token})" if token else ")")


@dataclass(frozen=True)
class HttpOptions:
    # requests in flight: waiting for a connection, a reply or a retry
    concurrency: int = option(64, "http(s) downloads in flight at once (default: %(default)s)",
                              flag="--io-concurrency", metavar="N")
    timeout: float = option(10.0, "connect timeout, and the longest silence while reading a reply "
                                  "(default: %(default)s)", flag="--http-timeout", metavar="S")
    retries: int = option(2, "more tries after a timeout, connection error, 408, 429 or 5xx, with exponential "
                             "backoff and jitter or the server's Retry-After (capped at 60 s); never for other "
                             "4xx (default: %(default)s)", metavar="N")
    per_host: int = option(16, "connections open to one host at once (default: %(default)s)",
                           flag="--per-host-connections", metavar="N")
    user_agent_token: str = option("", "added to the User-Agent, e.g. your project's name or contact address",
                                   metavar="TOKEN")
    respect_opt_out: bool = option(True, "write images even when their X-Robots-Tag says noai / noindex "
                                         "(default: skip them)", flag="--ignore-opt-out", action="store_false")
    max_bytes: int = option(64 << 20, "bodies larger than this are rejected as too_large (default: 64MiB; "
                                      "0 = no limit)", flag="--max-download-bytes", metavar="SIZE", parse=byte_size)
    max_retry_after: float = 60.0   # a longer Retry-After is cut to this
    backoff: float = 0.5            # first retry after ~backoff s (x0.5-1.5 jitter), doubling


@dataclass
class Outcome:
    data: bytes | None
    reason: str = ""                # "" when data holds the body
    detail: str = ""
    status: int | None = None       # the last HTTP status seen
    attempts: int = 0


def opted_out(values: list[str], agents: tuple[str, ...]) -> bool:
    """X-Robots-Tag values (`noai`, `noindex, nofollow`, `otherbot: noai`) forbid us?"""
    for value in values:
        scope = None
        for token in (t.strip().lower() for t in value.split(",")):
            if ":" in token:  # `bot: directives` applies to that bot only
                bot, _, token = (s.strip() for s in token.partition(":"))
                scope = bot
            if token in OPT_OUT_DIRECTIVES and (scope is None or scope in agents):
                return True
    return False


def retry_after(value: str | None, cap: float) -> float | None:
    """Seconds from a Retry-After header (delta seconds or an HTTP date), capped; None when absent."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            return None
    return min(max(seconds, 0.0), cap)


class _Attempt:
    """One GET: returns an Outcome, and whether and when to try again."""

    def __init__(self, opts: HttpOptions, agents: tuple[str, ...], metrics):
        self.opts, self.agents, self.metrics = opts, agents, metrics

    async def __call__(self, session, url: str) -> tuple[Outcome, bool, float | None]:
        seen: dict = {}  # what arrived before a timeout: the status, then the body's bytes
        try:
            return await self._get(session, url, seen)
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            return Outcome(None, TIMEOUT, _timeout_detail(seen, self.opts.timeout)), True, None
        except aiohttp.ClientConnectorDNSError as exc:
            return Outcome(None, DNS, _short(exc)), False, None
        except aiohttp.ClientConnectorError as exc:
            dns = isinstance(exc.os_error, socket.gaierror)
            return Outcome(None, DNS if dns else CONNECTION, _short(exc)), not dns, None
        except aiohttp.TooManyRedirects as exc:
            return Outcome(None, HTTP_ERROR, f"too many redirects ({_short(exc)})", exc.status), False, None
        except aiohttp.RedirectClientError as exc:  # to file://, ftp://, or no URL at all: asking again gives the same
            return Outcome(None, HTTP_ERROR, f"redirect to a non-http(s) or invalid URL: {_short(exc)}"), False, None
        except aiohttp.ClientResponseError as exc:  # a reply that is not HTTP (headers over 8 KB, bad status line)
            return Outcome(None, HTTP_ERROR, f"bad reply: {str(exc.message).split(':')[0]}"[:200]), False, None
        except (aiohttp.InvalidURL, ValueError) as exc:
            return Outcome(None, CONNECTION, f"invalid URL: {_short(exc)}"), False, None
        except (aiohttp.ClientError, OSError) as exc:  # reset, disconnected mid-body, broken payload
            return Outcome(None, CONNECTION, _short(exc)), True, None

    async def _get(self, session, url: str, seen: dict) -> tuple[Outcome, bool, float | None]:
        async with session.get(url) as resp:
            status = seen["status"] = resp.status
            if self.metrics:
                self.metrics.response(status)
            if status >= 300:
                retry = retryable(HTTP_ERROR, status)
                wait = retry_after(resp.headers.get("Retry-After"), self.opts.max_retry_after) if retry else None
                return Outcome(None, HTTP_ERROR, f"HTTP {status} {resp.reason or ''}".strip(), status), retry, wait
            if self.opts.respect_opt_out and opted_out(resp.headers.getall("X-Robots-Tag", []), self.agents):
                tag = ", ".join(resp.headers.getall("X-Robots-Tag"))
                return Outcome(None, OPTED_OUT, f"X-Robots-Tag: {tag}"[:200], status), False, None
            cap = self.opts.max_bytes
            if cap and (resp.content_length or 0) > cap:
                return Outcome(None, TOO_LARGE, f"Content-Length {resp.content_length} > {cap} bytes", status), False, None
            body = bytearray()
            async for chunk in resp.content.iter_chunked(1 << 16):
                body += chunk
                seen["bytes"] = len(body)
                if cap and len(body) > cap:
                    return Outcome(None, TOO_LARGE, f"body over {cap} bytes", status), False, None
            return Outcome(bytes(body), status=status), False, None


def _timeout_detail(seen: dict, timeout: float) -> str:
    if "status" not in seen:
        return f"no answer within {timeout:g} s"
    return (f"HTTP {seen['status']}, then the body stopped or was too slow after {seen.get('bytes', 0)} bytes "
            f"(at most {timeout:g} s of silence, {6 * timeout:g} s in all)")


class _Connector(aiohttp.TCPConnector):
    """A kept-alive connection that received bytes while idle (a server that sent more body than its
    Content-Length said) would hand them to the next request as its reply: such a connection is dropped
    instead of reused."""

    async def _get(self, key, *args, **kwargs):
        for proto, _ in list(getattr(self, "_conns", {}).get(key, ())):
            if proto.should_close:  # for an idle connection: data arrived, or it failed
                proto.close()
        return await super()._get(key, *args, **kwargs)


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__)[:200]


class Downloader:
    """An event loop on a background thread. `submit(tag, url)` from any thread; finished downloads
    queue up as (tag, Outcome) for `completed()`, and each makes `fileno()` readable (for poll)."""

    def __init__(self, opts: HttpOptions, metrics=None):
        self.opts, self.metrics = opts, metrics
        token = opts.user_agent_token.strip().lower()
        self._attempt = _Attempt(opts, ("mocostream",) + ((token,) if token else ()), metrics)
        self._done: collections.deque = collections.deque()
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="shards-download", daemon=True)
        self._thread.start()
        self._tasks: set = set()
        self._session = asyncio.run_coroutine_threadsafe(self._open(), self._loop).result()

    async def _open(self) -> aiohttp.ClientSession:
        t = self.opts.timeout
        connector = _Connector(limit=self.opts.concurrency, limit_per_host=self.opts.per_host, ttl_dns_cache=300)
        # total: a drip-feeding server still ends; sock_read: silence while reading ends sooner.
        timeout = aiohttp.ClientTimeout(total=6 * t, connect=None, sock_connect=t, sock_read=t)
        return aiohttp.ClientSession(connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar(),
                                     headers={"User-Agent": user_agent(self.opts.user_agent_token)})

    def fileno(self) -> int:
        return self._rfd

    def submit(self, tag, url: str) -> None:
        self._loop.call_soon_threadsafe(self._start, tag, url)

    def _start(self, tag, url: str) -> None:
        task = self._loop.create_task(self._fetch(tag, url))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, tag, url: str) -> None:
        started = time.monotonic()
        if self.metrics:
            self.metrics.in_flight.inc()
        try:
            outcome = await self.fetch(url)
        except Exception as exc:  # never lose an input: a bug here is still one accounted reject
            outcome = Outcome(None, CONNECTION, _short(exc))
        finally:
            if self.metrics:
                self.metrics.in_flight.dec()
        if self.metrics:
            self.metrics.downloaded(outcome, time.monotonic() - started)
        self._done.append((tag, outcome))
        try:
            os.write(self._wfd, b"x")
        except BlockingIOError:  # the pipe is full of wake-ups already
            pass

    async def fetch(self, url: str) -> Outcome:
        """GET with retries (see the module doc)."""
        attempt = 0
        while True:
            attempt += 1
            outcome, retry, wait = await self._attempt(self._session, url)
            outcome.attempts = attempt
            if not retry or attempt > self.opts.retries:
                return outcome
            backoff = self.opts.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            await asyncio.sleep(wait if wait is not None else backoff)

    def completed(self) -> list[tuple]:
        """Downloads finished since the last call, as (tag, Outcome)."""
        try:
            while os.read(self._rfd, 4096):
                pass
        except BlockingIOError:
            pass
        out = []
        while self._done:
            out.append(self._done.popleft())
        return out

    def close(self) -> None:
        async def shutdown():
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._session.close()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
        self._loop.close()
        os.close(self._rfd)
        os.close(self._wfd)
