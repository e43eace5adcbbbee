"""Decode in worker processes that can be killed and replaced: a per-file time budget that holds
even when a decoder hangs or spins, and a crash (segfault, OOM kill) that costs one input, not the run.

`DecodePool(n, options).imap(tasks)` takes `(locator, meta)` tasks in order and yields one
`(result, bytes_in)` per task, in the same order, with at most `window` tasks in flight (memory is
bounded by the options, not by the input size). `tasks` may yield PENDING (nothing ready yet, e.g.
downloads in flight): the pool then also waits on `wake_fd`, which turns readable when there may be more. A result is a Reject, or (with `meta` = key, source,
label, extra) a shards.record.Record whose shard bytes the worker already rendered: the main process,
which writes every shard in order and so limits how well the tool scales, only appends them.
Each worker holds up to DEPTH tasks so it never waits for the main process. Tasks and results of any size
(a task carries a downloaded image) travel over a socket whose main-process end never blocks
(shards/channel.py): the main process waits only in its poll, so it cannot deadlock with a worker and the
time budget is always enforced.
A worker that passes `timeout` seconds on one input is SIGKILLed: that input is rejected as `timeout`,
the worker's queued inputs go to other workers, and a fresh worker takes its place. n = 0 decodes in
this process (no isolation: for debugging and tiny runs). Each worker's address space is capped at its
start size + `memory_limit` (default from the pixel budget; 0 = no cap).
"""
from __future__ import annotations

import collections
import math
import multiprocessing as mp
import os
import pickle
import select
import signal
import threading
import time
from typing import Iterable, Iterator

from mocostream.pipeline import dali_check
from mocostream.pipeline.filesystems import Storage

from .channel import Channel, recv_frame, send_frame
from .feed import PENDING
from .fetch import FetchError, fetch
from .record import Record, encode
from .validate import CRASHED, TIMEOUT, Options, Reject, Sample, normalise

DEPTH = 4     # tasks queued per worker: slack for when the main process is not scheduled for a while
WINDOW = 8    # tasks in flight or waiting to be yielded, per worker


def process(task: tuple, options: Options, tar: bool, storage: Storage) -> tuple[Sample | Record | Reject, int]:
    """One input: fetch its bytes (remote ones through `storage`), decode and normalise them, render them for
    the shard (when `meta` names the sample). Never raises for bad data."""
    locator, meta = task
    try:
        data = fetch(locator, storage)
    except FetchError as exc:
        return exc.reject, 0
    result = normalise(data, options=options)
    if isinstance(result, Sample) and meta is not None:
        result = encode(result, *meta, tar=tar)
    return result, len(data)


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


def _dumps(obj) -> bytes:
    # Plain pickle, not Connection.send's ForkingPickler: a quarter of its per-message cost, and tasks and
    # results are only plain data (tuples, strings, dataclasses, bytes).
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


_PARENT_ENDS: set = set()  # our ends of the workers' pipes: a forked worker must close its copies


def _worker_main(conn, options: Options, tar: bool, storage: Storage, memory_limit: int, environ: dict, inherited: list[int],
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
    dali_check.checker()  # load DALI's decoder library before the address-space cap
    _limit_memory(memory_limit)
    # C decoders (libtiff, libjpeg) print warnings about bad files straight to fd 2; each bad file is
    # already reported once, with its reason, in rejects.jsonl. (Debug with --workers 0 to see them.)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    fd = conn.fileno()
    try:  # ready: a file's time budget starts now, not while the process and its libraries start
        send_frame(fd, b"")
    except OSError:
        return
    while True:
        try:
            while not conn.poll(1.0):
                if os.getppid() != parent:  # belt and braces: our parent died (kill -9) and we were reparented
                    return
            msg = recv_frame(fd)
        except (EOFError, OSError):  # the main process closed our channel (done), or is gone: so are we
            return
        seq, task = pickle.loads(msg)
        del msg  # a downloaded image: not kept twice while decoding
        result = process(task, options, tar, storage)
        try:  # blocks until the main process has read it all: it reads every worker whenever it waits
            send_frame(fd, _dumps((seq, *result)))
        except OSError:
            return


class _Worker:
    def __init__(self, ctx, options: Options, tar: bool, storage: Storage, memory_limit: int):
        self.conn, child = ctx.Pipe()
        inherited = [c.fileno() for c in _PARENT_ENDS | {self.conn}] if ctx.get_start_method() == "fork" else []
        parent = os.getpid() if ctx.get_start_method() == "fork" else -1
        self.proc = ctx.Process(target=_worker_main, daemon=True,
                                args=(child, options, tar, storage, memory_limit, dict(os.environ), inherited, parent))
        self.proc.start()
        child.close()
        _PARENT_ENDS.add(self.conn)
        self.fd = self.conn.fileno()
        self.chan = Channel(self.fd)  # non-blocking from here on: see shards/channel.py
        self.events = select.POLLIN   # what the run's poll watches on fd (POLLOUT too while chan.pending)
        self.inflight: collections.deque = collections.deque()  # (seq, task)
        self.ready = False  # until its ready message: start-up time is not charged to a file
        self.started = math.inf  # when the head task began (as far as we can tell)

    @property
    def decoding(self) -> bool:
        """Its head task has reached it in full: only then can it be stuck on it. (A task still partly in our
        buffer waits for us, e.g. while the main process writes a shard: that must not count as its time.)"""
        return bool(self.inflight) and self.chan.unsent < len(self.inflight)

    def send(self, seq: int, task: tuple) -> None:
        self.inflight.append((seq, task))
        self.chan.queue(_dumps((seq, task)))
        self.flush()

    def flush(self) -> None:
        was = self.decoding
        try:
            self.chan.flush()
        except OSError:
            pass  # it died: the read side sees EOF and the run replaces it
        if self.ready and not was and self.decoding:
            self.started = time.monotonic()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        _PARENT_ENDS.discard(self.conn)
        self.conn.close()

    def stop(self) -> None:
        # Closing our end is the stop signal: EOF on its next read, or EPIPE if it was sending to us.
        _PARENT_ENDS.discard(self.conn)
        self.conn.close()
        self.proc.join(2)
        if self.proc.is_alive():
            self.kill()

    def exit_detail(self) -> str:
        self.proc.join(1)
        code = self.proc.exitcode
        if code is not None and code < 0:
            return f"decoder process killed by signal {-code}"
        return f"decoder process exited with status {code}"


class _Run:
    """The state of one imap: the task source, results not yet yielded, tasks to hand out again."""

    def __init__(self, tasks: Iterator[tuple], window: int):
        self.tasks, self.window = tasks, window
        self.results: dict[int, tuple] = {}
        self.requeue: collections.deque = collections.deque()
        self.next_seq = self.yielded = 0
        self.exhausted = False

    def fill(self, workers: list[_Worker]) -> bool:
        """Hand out tasks until each worker holds DEPTH; True when the source has nothing ready (PENDING)."""
        for w in workers:
            while len(w.inflight) < DEPTH:
                if self.requeue:
                    w.send(*self.requeue.popleft())
                elif not self.exhausted and self.next_seq - self.yielded < self.window:
                    try:
                        task = next(self.tasks)
                    except StopIteration:
                        self.exhausted = True
                        break
                    if task is PENDING:
                        return True
                    w.send(self.next_seq, task)
                    self.next_seq += 1
                else:
                    break
        return False


class DecodePool:
    def __init__(self, workers: int, options: Options, timeout: float = 60.0, memory_limit: int | None = None,
                 tar: bool = True, storage: Storage | None = None):
        if memory_limit is None:
            memory_limit = default_memory_limit(options.max_pixels)
        self.n, self.options, self.timeout, self.memory_limit = workers, options, timeout, memory_limit
        self.tar = tar  # render tar members in the workers (Records for a tar output)
        self.storage = storage or Storage()  # how remote inputs are read: the run's timeouts and retries
        self.replaced = 0  # workers killed (timeout) or lost (crash) and started again
        self._started: list[_Worker] = []

    @property
    def ctx(self):
        # fork is ~50x faster to start than forkserver (0.7 s), but only safe while this process has no
        # other threads (s3fs, tqdm start some): then the forkserver, started once per process.
        if threading.active_count() == 1:
            return mp.get_context("fork")
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["mocostream.shards.workers"])
        return ctx

    def _new_worker(self) -> _Worker:
        return _Worker(self.ctx, self.options, self.tar, self.storage, self.memory_limit)

    def start(self) -> None:
        """Start the workers now (before threads exist, so they can be forked); imap uses them."""
        if self.n > 0 and not self._started:
            self._started = [self._new_worker() for _ in range(self.n)]

    def close(self) -> None:
        """Stop workers started but never used by imap (imap stops its own)."""
        for w in self._started:
            w.stop()
        self._started = []

    def imap(self, tasks: Iterable[tuple], wake_fd: int | None = None) -> Iterator[tuple[Sample | Record | Reject, int]]:
        if self.n <= 0:
            for task in tasks:
                if task is PENDING:
                    select.select([wake_fd], [], [])
                    continue
                yield process(task, self.options, self.tar, self.storage)
            return
        self.start()
        workers, self._started = self._started, []
        try:
            yield from self._run(workers, iter(tasks), wake_fd)
        finally:
            for w in workers:
                w.stop() if w.proc.is_alive() else w.kill()

    def _replace(self, workers: list[_Worker], w: _Worker, run: _Run, poller) -> None:
        poller.unregister(w.fd)  # before its fd is closed (and its number reused)
        w.kill()
        # Its queued (not yet started) tasks go first to whoever is free next, in order.
        run.requeue.extendleft(reversed(list(w.inflight)[1:]))
        fresh = self._new_worker()
        workers[workers.index(w)] = fresh
        poller.register(fresh.fd, fresh.events)
        self.replaced += 1

    def _run(self, workers: list[_Worker], tasks: Iterator[tuple], wake_fd: int | None) -> Iterator[tuple]:
        run = _Run(tasks, WINDOW * len(workers))
        # One poll set for the whole run (multiprocessing.connection.wait builds a selector per call,
        # which cost the main process more than reading the result itself). It is the only place the
        # main process waits on a worker: every send and read is non-blocking (shards/channel.py).
        poller = select.poll()
        for w in workers:
            poller.register(w.fd, w.events)
        watching = False  # wake_fd is polled only while the task source has nothing ready (else: a busy loop)
        while True:
            waiting = run.fill(workers)  # the task source has nothing ready: wait on wake_fd as well
            while run.yielded in run.results:
                yield run.results.pop(run.yielded)
                run.yielded += 1
            if wake_fd is not None and waiting != watching:
                poller.register(wake_fd, select.POLLIN) if waiting else poller.unregister(wake_fd)
                watching = waiting
            busy = [w for w in workers if w.inflight]
            if not busy:
                if run.exhausted and not run.requeue:
                    return
                if not waiting:
                    continue
            for w in workers:  # watch for room in a socket only while there is something left to write
                want = select.POLLIN | (select.POLLOUT if w.chan.pending else 0)
                if want != w.events:
                    poller.modify(w.fd, want)
                    w.events = want
            deadline = min((w.started for w in busy if w.decoding), default=math.inf) + self.timeout
            wait_ms = None if math.isinf(deadline) else max(0, math.ceil((deadline - time.monotonic()) * 1000))
            events = dict(poller.poll(wait_ms))
            heard = self._collect(workers, run, events, poller)
            now = time.monotonic()
            for w in list(workers):
                if w.decoding and now - w.started > self.timeout and w not in heard:
                    head_seq, _ = w.inflight[0]
                    run.results[head_seq] = (Reject(TIMEOUT, f"decoding took longer than {self.timeout:g} s"), 0)
                    self._replace(workers, w, run, poller)

    def _collect(self, workers: list[_Worker], run: _Run, events: dict, poller) -> set:
        """Write and read what the poll said each worker's socket allows; the workers that sent anything."""
        heard = set()
        for w in list(workers):
            if w.fd not in events:
                continue
            if w.chan.pending:
                w.flush()
            try:
                messages, progress = w.chan.read()
                if progress:
                    heard.add(w)
                    w.started = time.monotonic()  # it is sending: its head task's decoding is over
                for msg in messages:
                    if not w.ready:
                        if msg:
                            raise EOFError  # anything but the ready message first: treat as broken
                        w.ready, w.started = True, time.monotonic()
                        continue
                    if not w.inflight:
                        raise EOFError  # a result for no task: treat as broken
                    seq, result, nbytes = pickle.loads(msg)
                    assert seq == w.inflight[0][0]
                    w.inflight.popleft()
                    w.started = time.monotonic()  # the next task begins (if it has reached the worker)
                    run.results[seq] = (result, nbytes)
            except (EOFError, OSError):
                if w.inflight:
                    head_seq, _ = w.inflight[0]
                    run.results[head_seq] = (Reject(CRASHED, w.exit_detail()), 0)
                self._replace(workers, w, run, poller)
        return heard
