"""Messages between the main process and one decode worker, over a socket pair, such that the two can never
wait on each other.

The hang this prevents: the main process blocked sending a task (a downloaded image: megabytes) to a worker
that was itself blocked sending its result (megabytes) back, both socket buffers full, each waiting for the
other to read. Here the main process's end never blocks: `Channel.flush` writes what the socket takes and
keeps the rest until poll says it is writable again; `Channel.read` takes whatever has arrived and assembles
messages across calls. The main process therefore only ever waits in its poll, where it reads every worker,
so a worker's blocking send always completes; the worker's end stays blocking and simple (read one task,
decode it, send its result), see `send_frame` / `recv_frame`.

Why this and not shared memory or temp files for the payloads: no second resource to clean up when a worker
is SIGKILLed in a decoder or the whole run is kill -9ed (/dev/shm files outlive both), no size to reserve up
front (downloads go up to --max-download-bytes), and the same copies as before (one into the kernel, one out).

A frame is an 8-byte little-endian length, then that many bytes (a pickle; an empty frame is the worker's
"ready").
"""
from __future__ import annotations

import collections
import os
import struct

_HEADER = struct.Struct("<Q")


def send_frame(fd: int, payload: bytes) -> None:
    """Blocking: the whole frame (raises OSError when the peer is gone)."""
    parts = [memoryview(_HEADER.pack(len(payload))), memoryview(payload)]
    while parts:
        n = os.writev(fd, parts)
        parts = _advance(parts, n)


def _read_exactly(fd: int, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            raise EOFError("peer closed the channel")
        got += k
    return buf


def recv_frame(fd: int) -> bytearray:
    """Blocking: the next frame's payload; EOFError when the peer has closed its end."""
    (n,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size))
    return _read_exactly(fd, n)


def _advance(parts: list[memoryview], n: int) -> list[memoryview]:
    """`parts` less their first `n` bytes."""
    while parts and n >= len(parts[0]):
        n -= len(parts[0])
        parts = parts[1:]
    if parts and n:
        parts = [parts[0][n:], *parts[1:]]
    return parts


class Channel:
    """The main process's end: non-blocking, driven by the caller's poll (POLLIN always; POLLOUT while
    `pending`). The socket is switched to non-blocking mode."""

    def __init__(self, fd: int):
        self.fd = fd
        os.set_blocking(fd, False)
        self._out: collections.deque[list[memoryview]] = collections.deque()  # frames not yet fully written
        self._head = bytearray()          # the header of the frame being read, while incomplete
        self._body: bytearray | None = None
        self._got = 0                     # bytes of _body read so far

    @property
    def pending(self) -> bool:
        return bool(self._out)

    @property
    def unsent(self) -> int:
        """Messages not yet written in full (the last ones queued)."""
        return len(self._out)

    def queue(self, payload: bytes) -> None:
        """Send `payload` as soon as the socket takes it (call `flush`, now and whenever it is writable)."""
        self._out.append([memoryview(_HEADER.pack(len(payload))), memoryview(payload)])

    def flush(self) -> None:
        """Write what the socket takes now. OSError (EPIPE, ECONNRESET) when the worker is gone."""
        while self._out:
            parts = self._out[0]
            try:
                n = os.writev(self.fd, parts)
            except BlockingIOError:
                return
            parts = _advance(parts, n)
            if parts:
                self._out[0] = parts
                return  # the socket took less than offered: it is full
            self._out.popleft()

    def read(self) -> tuple[list[bytearray], bool]:
        """(messages completed now, whether any byte arrived). EOFError when the worker closed its end
        (it exited or died), OSError when the connection broke."""
        messages, progress = [], False
        while True:
            try:
                if self._body is None:
                    chunk = os.read(self.fd, _HEADER.size - len(self._head))
                    if not chunk:
                        raise EOFError("decoder process closed its end")
                    progress = True
                    self._head += chunk
                    if len(self._head) == _HEADER.size:
                        self._body, self._got = bytearray(_HEADER.unpack(self._head)[0]), 0
                        self._head = bytearray()
                if self._body is not None and self._got < len(self._body):
                    k = os.readv(self.fd, [memoryview(self._body)[self._got:]])
                    if k == 0:
                        raise EOFError("decoder process closed its end mid-message")
                    progress, self._got = True, self._got + k
            except BlockingIOError:
                return messages, progress
            if self._body is not None and self._got == len(self._body):
                messages.append(self._body)
                self._body = None
