"""A small HTTP proxy on 127.0.0.1 that injects storage faults in front of a real S3 server.

Faults, each at its own rate, drawn from a seeded RNG: connection resets (the socket is closed with no
reply), 500 InternalError and 503 SlowDown replies, added latency, and truncated bodies (the full
Content-Length is announced, part of the body is sent, then the connection is closed). Requests are
forwarded unchanged (the Host header too, so SigV4 signatures stay valid).
"""
from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
INTERNAL = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
            b"<Message>We encountered an internal error. Please try again.</Message></Error>")


KINDS = ("reset", "error_500", "slow_down_503", "truncate", "latency")


@dataclass
class Faults:
    reset: float = 0.0
    error_500: float = 0.0
    slow_down_503: float = 0.0
    truncate: float = 0.0
    latency: float = 0.0  # probability of added latency
    latency_seconds: float = 0.05
    only_get: bool = True  # inject only into GET (reads); writes pass through
    path_contains: str = ""  # inject only into requests for matching paths
    cycle: bool = False  # instead of rates: every 2nd matching request gets the next fault kind in turn
    seed: int = 0
    counts: dict = field(default_factory=dict)


class FaultProxy:
    def __init__(self, upstream_port: int, faults: Faults):
        self.faults, self.upstream_port = faults, upstream_port
        self.rng = random.Random(faults.seed)
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._draw(self.command, self.path)
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()
                    self.close_connection = True
                    return
                if fault in ("error_500", "slow_down_503"):
                    payload = INTERNAL if fault == "error_500" else SLOW_DOWN
                    self.send_response(500 if fault == "error_500" else 503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault == "latency":
                    time.sleep(proxy.faults.latency_seconds)
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                upstream.request(self.command, self.path, body=body, headers=headers)
                resp = upstream.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault == "truncate" and len(data) > 16:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.close()
                    self.close_connection = True
                    return
                self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _draw(self, method: str, path: str) -> str | None:
        f = self.faults
        if (f.only_get and method != "GET") or f.path_contains not in path:
            return None
        with self.lock:
            if f.cycle:
                self.seen = getattr(self, "seen", 0) + 1
                if self.seen % 2:
                    return None
                name = KINDS[(self.seen // 2 - 1) % len(KINDS)]
                f.counts[name] = f.counts.get(name, 0) + 1
                return name
            x = self.rng.random()
            for name in KINDS:
                rate = getattr(f, name)
                if x < rate:
                    f.counts[name] = f.counts.get(name, 0) + 1
                    return name
                x -= rate
        return None

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
