"""The ordered feed: this part's inputs -> downloads (many in flight, finishing in any order) -> decode
tasks in the order they became ready -> results back in INPUT order, so shards stay deterministic.

A slow or hanging URL holds back only the writing of its own position: downloads and decoding go on
for up to `window` positions after it (and `max_bytes` of downloaded or decoded data held for later),
so head-of-line waiting is bounded by the HTTP timeout and retries, not by the input order.
`max_bytes` is most of the main process's memory beyond its code: 64 MiB (~600 web photos) keeps the
process under 300 MB; 256 MiB filled up in a soak with 5-second answers and made it 390 MB, and bought no
speed (bench/soak.py ran as fast or faster with 64).
Inputs that are not http(s) URLs (files, tar members, s3://) need no download: their locator goes to
the decode workers as it is. A failed download goes there as a ("failed", ...) locator, which the
worker turns into its Reject at once: every input takes the same path, so accounting stays simple.
"""
from __future__ import annotations

import collections
from collections import Counter
from typing import Iterable, Iterator

from .discover import InputFile
from .download import Downloader, Outcome
from .keys import json_safe

PENDING = object()  # yielded by `tasks` when nothing is ready yet: wait on `fileno()`


class Feed:
    def __init__(self, items: Iterable[InputFile], start: int, downloader: Downloader | None,
                 window: int = 4096, max_bytes: int = 64 << 20):
        self._items = iter(items)
        self.head = self._next = start          # oldest position not yet handed back; next to start
        self.downloader, self.window, self.max_bytes = downloader, window, max_bytes
        self.concurrency = downloader.capacity if downloader else 0  # URLs handed to the download stage at once
        self._by_pos: dict[int, InputFile] = {}
        self._ready: collections.deque = collections.deque()   # (pos, locator)
        self._sent: collections.deque = collections.deque()    # positions in the order given to the decoders
        self.outcomes: dict[int, Outcome] = {}  # failed downloads' details (status, attempts), until written
        self.in_flight = 0
        self.held = 0                            # bytes downloaded or decoded, not yet handed back
        self.statuses: Counter = Counter()       # final HTTP status per URL ("none": no answer)
        self._exhausted = False

    def fileno(self) -> int | None:
        return self.downloader.fileno() if self.downloader else None

    def _fill(self) -> None:
        for pos, outcome in self.downloader.completed() if self.downloader else ():
            self.in_flight -= 1
            self.statuses[str(outcome.status or "none")] += 1
            if outcome.data is not None:
                self.held += len(outcome.data)
                self._ready.append((pos, ("bytes", outcome.data)))
            else:
                self.outcomes[pos] = outcome
                self._ready.append((pos, ("failed", outcome.reason, outcome.detail)))
        while (not self._exhausted and self._next - self.head < self.window and self.held < self.max_bytes
               and (self.in_flight < self.concurrency or not self.downloader)):
            item = next(self._items, None)
            if item is None:
                self._exhausted = True
                break
            pos, self._next = self._next, self._next + 1
            self._by_pos[pos] = item
            if item.locator[0] == "http" and self.downloader:
                self.downloader.submit(pos, item.locator[1])
                self.in_flight += 1
            else:
                self._ready.append((pos, item.locator))
            if not self.downloader and self._ready:
                break  # in-process order: one at a time is enough

    def tasks(self) -> Iterator:
        """Decode tasks `(locator, meta)` in the order they are ready; PENDING while waiting on downloads."""
        while True:
            self._fill()
            if self._ready:
                pos, loc = self._ready.popleft()
                if loc[0] == "bytes":
                    self.held -= len(loc[1])
                it = self._by_pos[pos]
                self._sent.append(pos)
                yield loc, (it.key, json_safe(it.path), json_safe(it.label), it.extra)
            elif self._exhausted and not self.in_flight:
                return
            else:
                yield PENDING

    def ordered(self, results: Iterable[tuple]) -> Iterator[tuple[int, InputFile, object, int]]:
        """(position, input, result, bytes in) in input order, from the decoders' results (which come
        in the order `tasks` handed them out)."""
        pending: dict[int, tuple] = {}
        for result, nbytes in results:
            pos = self._sent.popleft()
            size = len(getattr(result, "tar", b"") or getattr(result, "image", b""))
            pending[pos] = (result, nbytes, size)
            self.held += size
            while self.head in pending:
                result, nbytes, size = pending.pop(self.head)
                self.held -= size
                pos, self.head = self.head, self.head + 1
                yield pos, self._by_pos.pop(pos), result, nbytes
