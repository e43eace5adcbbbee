"""Decode in worker processes that can be killed and replaced: a per-file time budget that holds
even when a decoder hangs or spins, and a crash (segfault, OOM kill) that costs one input, not the run.

`DecodePool(n, options).imap(tasks)` takes (locator) tasks in order and yields one `(result, bytes_in)`
per task, in the same order, with at most `window` tasks in flight (memory is bounded by the options,
not by the input size). Each worker holds up to DEPTH tasks so it never waits for the main process.
A worker that passes `timeout` seconds on one input is SIGKILLed: that input is rejected as `timeout`,
the worker's queued inputs go to other workers, and a fresh worker takes its place. n = 0 decodes in
this process (no isolation: for debugging and tiny runs). Each worker's address space is capped at its
start size + `memory_limit` (default from the pixel budget; 0 = no cap).
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import os
import signal
import threading
import time
from multiprocessing.connection import wait
from typing import Iterable, Iterator

from .fetch import FetchError, fetch
from .validate import CRASHED, TIMEOUT, Options, Reject, Sample, normalise

DEPTH = 2     # tasks queued per worker
WINDOW = 8    # tasks in flight or waiting to be yielded, per worker


def process(locator: tuple, options: Options) -> tuple[Sample | Reject, int]:
    """One input: fetch its bytes, decode and normalise them. Never raises for bad data."""
    try:
        data = fetch(locator)
    except FetchError as exc:
        return exc.reject, 0
    return normalise(data, options=options), len(data)


def default_memory_limit(max_pixels: int) -> int:
    """Address space a worker may add to what it starts with: enough for a few full copies of the
    largest image the pixel budget lets through (RGBA decode, rotation, RGB conversion, JPEG buffer)."""
    return 16 * max_pixels + (512 << 20)


def _limit_memory(extra_bytes: int) -> None:
    """Cap this process's address space at its current size + extra_bytes: a file that makes the
    decoder allocate past it gets a MemoryError (-> rejected as decompression_bomb), not the OOM killer.
    Relative to the current size because a forked worker inherits its parent's mappings (torch, ...)."""
    if extra_bytes <= 0:
        return
    import resource

    with open("/proc/self/status") as f:
        vm = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:")), None)
    if vm is not None:
        resource.setrlimit(resource.RLIMIT_AS, (vm + extra_bytes, resource.RLIM_INFINITY))


_PARENT_ENDS: set = set()  # our ends of the workers' pipes: a forked worker must close its copies


def _worker_main(conn, options: Options, memory_limit: int, environ: dict, inherited: list[int],
                 parent: int) -> None:
    # A forked worker holds copies of the main process's pipe ends (its own and its siblings'); closed,
    # the main process's death reaches every worker as EOF on its pipe.
    for fd in inherited:
        try:
            os.close(fd)
        except OSError:
            pass
    # Workers fork from the forkserver, started with the environment of its first use; take this
    # run's (AWS_* credentials and endpoint may have changed since).
    os.environ.clear()
    os.environ.update(environ)
    if parent < 0:  # forkserver: our parent is the forkserver, which exits with the main process
        parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the main process handles it
    _limit_memory(memory_limit)
    # C decoders (libtiff, libjpeg) print warnings about bad files straight to fd 2; each bad file is
    # already reported once, with its reason, in rejects.jsonl. (Debug with --workers 0 to see them.)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    while True:
        try:
            while not conn.poll(1.0):
                if os.getppid() != parent:  # belt and braces: our parent died (kill -9) and we were reparented
                    return
            msg = conn.recv()
        except (EOFError, OSError):  # the main process is gone (finished, crashed, kill -9): so are we
            return
        if msg is None:
            return
        seq, locator = msg
        result = process(locator, options)
        try:
            conn.send((seq, *result))
        except (BrokenPipeError, OSError):
            return


class _Worker:
    def __init__(self, ctx, options: Options, memory_limit: int):
        self.conn, child = ctx.Pipe()
        inherited = [c.fileno() for c in _PARENT_ENDS | {self.conn}] if ctx.get_start_method() == "fork" else []
        parent = os.getpid() if ctx.get_start_method() == "fork" else -1
        self.proc = ctx.Process(target=_worker_main, daemon=True,
                                args=(child, options, memory_limit, dict(os.environ), inherited, parent))
        self.proc.start()
        child.close()
        _PARENT_ENDS.add(self.conn)
        self.inflight: collections.deque = collections.deque()  # (seq, locator)
        self.started = 0.0  # when the head task began (as far as we can tell)

    def send(self, seq: int, locator: tuple) -> None:
        if not self.inflight:
            self.started = time.monotonic()
        self.inflight.append((seq, locator))
        self.conn.send((seq, locator))

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        _PARENT_ENDS.discard(self.conn)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(2)
        if self.proc.is_alive():
            self.kill()
        else:
            _PARENT_ENDS.discard(self.conn)
            self.conn.close()

    def exit_detail(self) -> str:
        self.proc.join(1)
        code = self.proc.exitcode
        if code is not None and code < 0:
            return f"decoder process killed by signal {-code}"
        return f"decoder process exited with status {code}"


class DecodePool:
    def __init__(self, workers: int, options: Options, timeout: float = 60.0, memory_limit: int | None = None):
        if memory_limit is None:
            memory_limit = default_memory_limit(options.max_pixels)
        self.n, self.options, self.timeout, self.memory_limit = workers, options, timeout, memory_limit
        self.replaced = 0  # workers killed (timeout) or lost (crash) and started again
        self._started: list[_Worker] = []

    @property
    def ctx(self):
        # fork is ~50x faster to start than forkserver (0.7 s), but only safe while this process has no
        # other threads (s3fs, tqdm start some): then the forkserver, started once per process.
        if threading.active_count() == 1:
            return mp.get_context("fork")
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["shards.workers"])
        return ctx

    def start(self) -> None:
        """Start the workers now (before threads exist, so they can be forked); imap uses them."""
        if self.n > 0 and not self._started:
            self._started = [_Worker(self.ctx, self.options, self.memory_limit) for _ in range(self.n)]

    def close(self) -> None:
        """Stop workers started but never used by imap (imap stops its own)."""
        for w in self._started:
            w.stop()
        self._started = []

    def imap(self, tasks: Iterable[tuple]) -> Iterator[tuple[Sample | Reject, int]]:
        if self.n <= 0:
            for locator in tasks:
                yield process(locator, self.options)
            return
        self.start()
        workers, self._started = self._started, []
        try:
            yield from self._run(workers, iter(tasks))
        finally:
            for w in workers:
                w.stop() if w.proc.is_alive() else w.kill()

    def _replace(self, workers: list[_Worker], w: _Worker, requeue: collections.deque) -> None:
        w.kill()
        # Its queued (not yet started) tasks go first to whoever is free next, in order.
        requeue.extendleft(reversed(list(w.inflight)[1:]))
        workers[workers.index(w)] = _Worker(self.ctx, self.options, self.memory_limit)
        self.replaced += 1

    def _run(self, workers: list[_Worker], tasks: Iterator[tuple]) -> Iterator[tuple]:
        results: dict[int, tuple] = {}
        requeue: collections.deque = collections.deque()
        next_seq = yielded = 0
        exhausted = False
        window = WINDOW * len(workers)
        while True:
            for w in workers:
                while len(w.inflight) < DEPTH:
                    if requeue:
                        w.send(*requeue.popleft())
                    elif not exhausted and next_seq - yielded < window:
                        try:
                            locator = next(tasks)
                        except StopIteration:
                            exhausted = True
                            break
                        w.send(next_seq, locator)
                        next_seq += 1
                    else:
                        break
            while yielded in results:
                yield results.pop(yielded)
                yielded += 1
            busy = [w for w in workers if w.inflight]
            if not busy:
                if exhausted and not requeue:
                    return
                continue
            now = time.monotonic()
            deadline = min(w.started for w in busy) + self.timeout
            ready = wait([w.conn for w in busy], timeout=max(0.0, deadline - now))
            for w in busy:
                if w.conn not in ready:
                    continue
                try:
                    seq, result, nbytes = w.conn.recv()
                except (EOFError, OSError):
                    head_seq, _ = w.inflight[0]
                    results[head_seq] = (Reject(CRASHED, w.exit_detail()), 0)
                    self._replace(workers, w, requeue)
                    continue
                assert seq == w.inflight[0][0]
                w.inflight.popleft()
                w.started = time.monotonic()
                results[seq] = (result, nbytes)
            now = time.monotonic()
            for w in list(workers):
                if w.inflight and now - w.started > self.timeout and w.conn not in ready:
                    head_seq, _ = w.inflight[0]
                    results[head_seq] = (Reject(TIMEOUT, f"decoding took longer than {self.timeout:g} s"), 0)
                    self._replace(workers, w, requeue)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
