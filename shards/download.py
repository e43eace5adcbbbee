"""The download stage: many HTTP(S) requests in flight, politely, off the decode workers.

Why asyncio + aiohttp (not threads): one event-loop thread in the main process holds hundreds of
requests for the CPU of one, where a thread per request costs a stack and GIL hand-offs per chunk
(on 2 cores the main process also writes every shard); aiohttp's connector gives the per-host connection
limit and the connect/read timeouts built in, and its HTTP parser is C. aiohttp is already installed
through s3fs. The decode workers keep their isolation: they get the bytes, never a socket.

Per URL: connect and read timeouts; up to `retries` more tries with exponential backoff and jitter on
connection errors, timeouts, 408, 429 and 5xx (honouring `Retry-After`, capped), never on other 4xx or DNS
failures, and never more: aiohttp's own resend of a request on a dropped connection is turned off
(shards.addresses.guard), so a server sees at most 1 + `retries` requests per URL. Per host: as many
connections as it handles well (shards.hosts: adaptive, between 1 and --per-host-connections). Only public
addresses are fetched unless --allow-private-addresses (shards.addresses), after every redirect too;
at most --max-redirects redirects, to http(s) only. A User-Agent naming the tool, its version and the
user's token; `X-Robots-Tag` noai / noimageai / noindex / noimageindex (for every robot, or for ours)
means the image is not written; bodies over `max_bytes` are cut off. Every failure gets a reason a person
can act on (see REASONS).
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
from typing import NamedTuple
from urllib.parse import urlsplit

import aiohttp

from .addresses import (BlockedAddress, BlockedAddressError, ConnectionDropped, PublicResolver, RedirectRefused,
                        guard, parse_networks)
from .hosts import OVERLOAD, Hosts
from .options import byte_size, option
from .validate import BLOCKED_ADDRESS, CONNECTION, DNS, HTTP_ERROR, OPTED_OUT, TIMEOUT, TOO_LARGE

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
    per_host: int = option(64, "most connections open to one host at once: each host starts at 4 and gets more "
                               "while it answers quickly and cleanly, half as many after a 429, 503, timeout "
                               "or dropped connection (default: %(default)s)",
                           flag="--per-host-connections", metavar="N")
    max_redirects: int = option(5, "redirects followed per URL, to http(s) URLs only (default: %(default)s)",
                                metavar="N")
    allow_private: bool = option(False, "also fetch from loopback, private, link-local and other non-public "
                                        "addresses (refused by default, after every redirect too, as "
                                        "blocked_address)", flag="--allow-private-addresses")
    allow_networks: str = option("", "networks fetched even though not public, the rest staying refused, e.g. "
                                     "10.20.0.0/16,192.168.7.5 for an intranet image server", metavar="CIDR,...")
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


class Try(NamedTuple):
    outcome: Outcome
    retry: bool                  # worth another try
    wait: float | None = None    # the reply's Retry-After
    latency: float | None = None  # seconds to the reply's headers (None: no reply)


class _Attempt:
    """One GET (redirects followed): its Outcome, whether and when to try again, and how fast it was."""

    def __init__(self, opts: HttpOptions, agents: tuple[str, ...], metrics):
        self.opts, self.agents, self.metrics = opts, agents, metrics

    async def __call__(self, session, url: str) -> Try:
        seen: dict = {}  # what arrived before a timeout: the status, then the body's bytes
        try:
            return await self._get(session, url, time.monotonic(), seen)
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            return Try(Outcome(None, TIMEOUT, _timeout_detail(seen, self.opts.timeout)), True)
        except BlockedAddressError as exc:
            return Try(Outcome(None, BLOCKED_ADDRESS, str(exc)[:200]), False)
        except RedirectRefused as exc:
            return Try(Outcome(None, HTTP_ERROR, str(exc)[:200], exc.status), False)
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, BlockedAddress):
                return Try(Outcome(None, BLOCKED_ADDRESS, str(exc.os_error)[:200]), False)
            dns = isinstance(exc, aiohttp.ClientConnectorDNSError) or isinstance(exc.os_error, socket.gaierror)
            return Try(Outcome(None, DNS if dns else CONNECTION, _short(exc)), not dns)
        except aiohttp.TooManyRedirects as exc:
            detail = f"more than {self.opts.max_redirects} redirects"
            return Try(Outcome(None, HTTP_ERROR, detail, exc.history[-1].status if exc.history else None), False)
        except aiohttp.RedirectClientError as exc:  # to file://, ftp://, or no URL at all: asking again gives the same
            return Try(Outcome(None, HTTP_ERROR, f"redirect to a non-http(s) or invalid URL: {_short(exc)}"), False)
        except aiohttp.ClientResponseError as exc:  # a reply that is not HTTP (headers over 8 KB, bad status line)
            return Try(Outcome(None, HTTP_ERROR, f"bad reply: {str(exc.message).split(':')[0]}"[:200]), False)
        except (aiohttp.InvalidURL, ValueError) as exc:
            return Try(Outcome(None, CONNECTION, f"invalid URL: {_short(exc)}"), False)
        except ConnectionDropped as exc:  # reset or closed before the reply
            return Try(Outcome(None, CONNECTION, str(exc)[:200]), True)
        except (aiohttp.ClientError, OSError) as exc:  # disconnected mid-body, broken payload
            return Try(Outcome(None, CONNECTION, _short(exc)), True)

    async def _get(self, session, url: str, start: float, seen: dict) -> Try:
        follow = self.opts.max_redirects > 0  # aiohttp raises at the max_redirects-th redirect: allow one more
        async with session.get(url, allow_redirects=follow, max_redirects=self.opts.max_redirects + 1) as resp:
            latency = time.monotonic() - start
            status = seen["status"] = resp.status
            if self.metrics:
                self.metrics.response(status)
            if status >= 300:
                retry = retryable(HTTP_ERROR, status)
                wait = retry_after(resp.headers.get("Retry-After"), self.opts.max_retry_after) if retry else None
                detail = f"HTTP {status} {resp.reason or ''}".strip() + (
                    " (redirects not followed: --max-redirects 0)" if 300 <= status < 400 and not follow else "")
                return Try(Outcome(None, HTTP_ERROR, detail, status), retry, wait, latency)
            if self.opts.respect_opt_out and opted_out(resp.headers.getall("X-Robots-Tag", []), self.agents):
                tag = ", ".join(resp.headers.getall("X-Robots-Tag"))
                return Try(Outcome(None, OPTED_OUT, f"X-Robots-Tag: {tag}"[:200], status), False, None, latency)
            cap = self.opts.max_bytes
            if cap and (resp.content_length or 0) > cap:
                detail = f"Content-Length {resp.content_length} > {cap} bytes"
                return Try(Outcome(None, TOO_LARGE, detail, status), False, None, latency)
            body = bytearray()
            async for chunk in resp.content.iter_chunked(1 << 16):
                body += chunk
                seen["bytes"] = len(body)
                if cap and len(body) > cap:
                    return Try(Outcome(None, TOO_LARGE, f"body over {cap} bytes", status), False, None, latency)
            return Try(Outcome(bytes(body), status=status), False, None, latency)


def _signal(t: Try | None) -> str:
    """What an attempt says about its host (shards.hosts): "ok" it answered, an overload cause, or "none"."""
    if t is None:
        return "none"
    o = t.outcome
    if o.reason in (TIMEOUT, CONNECTION):
        return o.reason if t.retry else "none"  # an invalid URL never reached the host
    if o.reason == HTTP_ERROR and o.status in (429, 503):
        return str(o.status)
    return "ok" if t.latency is not None else "none"


def host_key(url: str) -> str:
    """The host (and a non-default port) that a URL's connection limit belongs to."""
    try:
        parts = urlsplit(url)
        host, port = (parts.hostname or "").lower(), parts.port
    except ValueError:
        return ""
    return f"{host}:{port}" if port and port != {"http": 80, "https": 443}.get(parts.scheme) else host


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


def open_session(opts: HttpOptions, resolver=None) -> aiohttp.ClientSession:
    """The aiohttp session of the download stage (call on its event loop). `resolver`: the name resolver
    under the public-address filter (default: aiohttp's)."""
    t = opts.timeout
    allowed = parse_networks(opts.allow_networks)
    # The connector's per-host limit only backs up shards.hosts, which holds each host to its adaptive limit.
    connector = _Connector(limit=opts.concurrency, limit_per_host=opts.per_host, ttl_dns_cache=300,
                           resolver=resolver if opts.allow_private else PublicResolver(resolver, allowed))
    # total: a drip-feeding server still ends; sock_read: silence while reading ends sooner.
    timeout = aiohttp.ClientTimeout(total=6 * t, connect=None, sock_connect=t, sock_read=t)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar(),
                                 headers={"User-Agent": user_agent(opts.user_agent_token)},
                                 middlewares=(guard(opts.allow_private, allowed),))


class Downloader:
    """An event loop on a background thread. `submit(tag, url)` from any thread; finished downloads
    queue up as (tag, Outcome) for `completed()`, and each makes `fileno()` readable (for poll).
    `summary` says how the hosts are served (connections, back-offs), refreshed every second."""

    REPORT_EVERY = 1.0
    TOP_HOSTS = 10  # hosts named in the metrics; the rest are summed up as "other"
    # URLs that may be handed over at once, per request allowed in flight: those waiting for a busy or paused
    # host hold no connection, so one slow host does not use up --io-concurrency for all the others
    QUEUED_PER_REQUEST = 16

    def __init__(self, opts: HttpOptions, metrics=None):
        self.opts, self.metrics = opts, metrics
        token = opts.user_agent_token.strip().lower()
        self._attempt = _Attempt(opts, ("mocostream",) + ((token,) if token else ()), metrics)
        self.hosts = Hosts(start=4, cap=opts.per_host)
        self.capacity = opts.concurrency * self.QUEUED_PER_REQUEST
        self.summary = ""
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
        self._requests = asyncio.Semaphore(self.opts.concurrency)  # requests on the wire, all hosts together
        self._reporter = asyncio.get_running_loop().create_task(self._report())
        return open_session(self.opts)

    async def _report(self) -> None:
        while True:
            self._publish()
            await asyncio.sleep(self.REPORT_EVERY)

    def _publish(self) -> None:
        top, other, known = self.hosts.top(self.TOP_HOSTS)
        conns = other + sum(t[1] for t in top)
        lead = f" (most: {top[0][0][:40]} {top[0][1]}/{int(top[0][2])})" if top else ""
        self.summary = f"{conns} conns to {known} hosts{lead}, {sum(self.hosts.backoffs.values())} back-offs"
        if self.metrics:
            self.metrics.hosts(top, other, self.hosts.backoffs, self.hosts.pauses)

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
        """GET with retries (see the module doc), each try within its host's connection limit."""
        host, loop = host_key(url), asyncio.get_running_loop()
        attempt, failed = 0, False
        while True:
            attempt += 1
            gate = self.hosts.gate(host)
            started = await self.hosts.acquire(gate)
            t, crowded = None, False
            try:
                async with self._requests:
                    started = loop.time()
                    t = await self._attempt(self._session, url)
                    crowded = self._requests.locked()  # all requests in use: this host was not the limit
            finally:
                signal = _signal(t)
                if signal in OVERLOAD:  # a URL that fails again says more about itself than about its host
                    signal, failed = ("again" if failed else signal), True
                self.hosts.release(gate, started, signal, None if crowded else t and t.latency, t and t.wait)
            t.outcome.attempts = attempt
            if not t.retry or attempt > self.opts.retries:
                return t.outcome
            backoff = self.opts.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            await asyncio.sleep(t.wait if t.wait is not None else backoff)

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
            self._reporter.cancel()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(self._reporter, *self._tasks, return_exceptions=True)
            self._publish()  # the final counts
            await self._session.close()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
        self._loop.close()
        os.close(self._rfd)
        os.close(self._wfd)
