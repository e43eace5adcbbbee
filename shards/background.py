"""Run jobs on one background thread, in the order they were submitted, with a bounded backlog.

Finishing a shard (fsync + rename, or an upload to S3, then its stats checkpoint) takes tens of
milliseconds locally and seconds on S3. Done by the main process, it stalled the decode workers, which
ran out of inputs meanwhile; on this thread it overlaps with decoding. One thread keeps the publishing
order (shard N's checkpoint before shard N+1's), and `backlog` bounds how many finished shards can wait
on local disk. An error in a job is raised in the main thread at the next `submit` or at `drain`.
"""
from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor


class InOrder:
    def __init__(self, backlog: int = 1):
        self.backlog = backlog
        self._pool: ThreadPoolExecutor | None = None  # started on first use: no thread for tiny runs
        self._pending: collections.deque[Future] = collections.deque()

    def submit(self, fn, *args) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="shards-publish")
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self.backlog:
            self._pending.popleft().result()

    def drain(self) -> None:
        """Wait for every job; raise the first error."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Wait for every job (errors dropped: called when already failing) and stop the thread."""
        for f in self._pending:
            f.exception()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
