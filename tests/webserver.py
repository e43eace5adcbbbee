"""A threaded HTTP server on 127.0.0.1 that serves images under many URLs, with injected latency and
failures chosen by the URL's path, and counts what it saw (peak concurrency, User-Agents, request times).

Paths: /<kind>/<n>.jpg serves image n (of the list given, modulo its length) after `latency` seconds,
where kind is one of
  ok           200 and the image
  404          404 Not Found
  reset        the connection is reset (RST) with no reply
  hang         no reply until `hang` seconds pass (or the server stops)
  503, 429     that status with `Retry-After: <retry_after>` on the first request, then the image
  optout       200 with `X-Robots-Tag: noai`
  optout_other 200 with `X-Robots-Tag: otherbot: noindex` (meant for another robot)
  big          a body of `big_bytes` bytes with its Content-Length
  bigchunked   the same without Content-Length (chunked)
  slow         the image after `slow` more seconds
  gate         the image once the server has seen `gate_after` requests in all (a head-of-line probe)
  down         503 while `down` is set, then the image
  503always, 429always   that status with `Retry-After: <retry_after>` on every request
  redirect     302 to `redirect_to` (formatted with n=n: a full URL, or a path on the same host)
  loop         302 to itself, for ever
  to_file, to_ftp, bigheader, longbody, drip: see ODD
With `max_active` set, any request beyond that many at once is answered 429 at once (no Retry-After),
as a host that limits each client's concurrent connections does; `refused` counts them.
`mix(n, rates, seed)` spreads kinds over n URLs for benchmarks.
"""
from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KINDS = ("ok", "404", "reset", "hang", "503", "429", "optout", "optout_other", "big", "bigchunked", "slow", "gate",
         "down", "503always", "429always", "redirect", "loop")
# Odd answers (_Handler._odd): a redirect to file:// or ftp://, 100 KB of headers, a body longer than its
# Content-Length (the extra bytes sit on the kept-alive connection), a body dripped a few bytes at a time.
ODD = ("to_file", "to_ftp", "bigheader", "longbody", "drip")
KINDS += ODD


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real image hosts do

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        srv: WebServer = self.server.owner
        over = srv.enter(self)
        try:
            if over:
                return self._send(429, b"too many connections", {})
            self._answer(srv)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            srv.leave()

    def _answer(self, srv: "WebServer") -> None:
        parts = self.path.strip("/").split("/")
        kind = parts[0] if len(parts) == 2 and parts[0] in KINDS else "404"
        n = int("".join(ch for ch in parts[-1].split(".")[0] if ch.isdigit()) or 0)
        if srv.latency:
            srv.stopping.wait(srv.latency)
        if kind in ODD:
            return self._odd(srv, kind, n)
        if kind == "404":
            return self._send(404, b"not found", {"Content-Type": "text/plain"})
        if kind == "reset":
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if kind == "hang":
            srv.stopping.wait(srv.hang)
            self.close_connection = True
            return
        if kind in ("503", "429") and srv.times[self.path][:-1] == []:  # the first request of this path
            return self._send(int(kind), b"busy", {"Retry-After": str(srv.retry_after)})
        if kind in ("503always", "429always"):
            return self._send(int(kind[:3]), b"busy", {"Retry-After": str(srv.retry_after)})
        if kind in ("redirect", "loop"):
            return self._send(302, b"", {"Location": self.path if kind == "loop" else srv.redirect_to.format(n=n)})
        if kind == "down" and srv.down:
            return self._send(503, b"down", {})
        if kind == "slow":
            srv.stopping.wait(srv.slow)
        if kind == "gate":
            with srv.seen:
                srv.seen.wait_for(lambda: srv.requests >= srv.gate_after or srv.stopping.is_set(), timeout=srv.hang)
        headers = {"Content-Type": "image/jpeg"}
        if kind == "optout":
            headers["X-Robots-Tag"] = "noai"
        if kind == "optout_other":
            headers["X-Robots-Tag"] = "otherbot: noindex"
        if kind in ("big", "bigchunked"):
            return self._big(srv, kind == "bigchunked")
        self._send(200, srv.images[n % len(srv.images)], headers)

    def _odd(self, srv: "WebServer", kind: str, n: int) -> None:
        image = srv.images[n % len(srv.images)]
        if kind in ("to_file", "to_ftp"):
            target = "file:///etc/passwd" if kind == "to_file" else f"ftp://127.0.0.1/{n}.jpg"
            return self._send(302, b"", {"Location": target})
        if kind == "bigheader":
            return self._send(200, image, {"Content-Type": "image/jpeg", "X-Filler": "x" * 100_000})
        if kind == "longbody":  # more bytes than its Content-Length, once `extra` is set (the client has
            self.send_response(200)  # its reply and keeps the connection): they would read as the next reply
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)
            if srv.extra.wait(srv.hang) and not srv.stopping.is_set():
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nWRONG")
                srv.extra_sent.set()
            return
        self.send_response(200)  # drip: a few bytes every drip_every seconds, never the end
        self.send_header("Content-Length", str(len(image)))
        self.end_headers()
        for i in range(0, len(image), 16):
            self.wfile.write(image[i:i + 16])
            self.wfile.flush()
            if srv.stopping.wait(srv.drip_every):
                break
        self.close_connection = True

    def _send(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _big(self, srv: "WebServer", chunked: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(srv.big_bytes))
        self.end_headers()
        chunk = b"\0" * 65536
        left = srv.big_bytes
        while left > 0:
            part = chunk[:min(left, len(chunk))]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            left -= len(part)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the listen backlog (set before listen): many clients connect at once
    daemon_threads = True


class WebServer:
    def __init__(self, images: list[bytes], latency: float = 0.0, hang: float = 60.0, retry_after: int = 1,
                 big_bytes: int = 4 << 20, hosts: int = 1):
        self.images, self.latency, self.hang, self.retry_after, self.big_bytes = images, latency, hang, retry_after, big_bytes
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.seen = threading.Condition(self.lock)
        self.slow, self.gate_after, self.down = 0.3, 0, False
        self.drip_every = 0.1
        self.extra, self.extra_sent = threading.Event(), threading.Event()  # longbody's extra bytes
        self.redirect_to, self.max_active = "/ok/{n}.jpg", 0
        self.active = self.peak = self.requests = self.refused = 0
        self.agents: set[str] = set()
        self.auth: dict[str, str] = {}  # path -> its last Authorization header
        self.times: dict[str, list[float]] = defaultdict(list)
        self.per_host: Counter = Counter()  # requests by listening address
        # hosts > 1: the same content on 127.0.0.1, 127.0.0.2, ... (one listener each), standing in for
        # the many hosts of a web-scale list (per-host limits apply per address).
        self.servers = []
        for h in range(hosts):
            httpd = _Server((f"127.0.0.{h + 1}", 0), _Handler)
            httpd.handle_error = lambda request, address: None  # clients that hang up are expected here
            httpd.owner = self
            self.servers.append(httpd)
        self.httpd = self.servers[0]
        self.threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in self.servers]

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def urls(self) -> list[str]:
        return [f"http://{s.server_address[0]}:{s.server_address[1]}" for s in self.servers]

    def enter(self, handler) -> bool:
        """Count a request; True when it is over `max_active` (to be refused)."""
        with self.lock:
            self.active += 1
            self.requests += 1
            self.peak = max(self.peak, self.active)
            self.agents.add(handler.headers.get("User-Agent", ""))
            self.auth[handler.path] = handler.headers.get("Authorization", "")
            self.times[handler.path].append(time.monotonic())
            self.per_host[handler.server.server_address[0]] += 1
            self.seen.notify_all()
            over = bool(self.max_active) and self.active > self.max_active
            self.refused += over
            return over

    def leave(self) -> None:
        with self.lock:
            self.active -= 1

    def reset_counts(self) -> None:
        with self.lock:
            self.peak = self.requests = self.refused = 0
            self.times.clear()
            self.per_host.clear()

    def __enter__(self) -> "WebServer":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.extra.set()
        with self.seen:
            self.seen.notify_all()
        for httpd in self.servers:
            httpd.shutdown()
            httpd.server_close()


def mix(n: int, rates: dict[str, float], seed: int = 0) -> list[str]:
    """n kinds: each non-ok kind at its rate, the rest ok, shuffled with the seed."""
    kinds = [k for k, r in rates.items() for _ in range(round(n * r))]
    kinds += ["ok"] * (n - len(kinds))
    random.Random(seed).shuffle(kinds)
    return kinds
