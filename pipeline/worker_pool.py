"""The opencv backend's augmentation worker processes, tied to the trainer's life.

- They ignore SIGINT and SIGTERM: Ctrl-C (or `timeout`, or a runtime signalling the whole process group)
  must reach the trainer only, which checkpoints and then shuts the pool down itself. Workers that died
  first would break the pool under the running step.
- They exit when the trainer is gone, even after `kill -9`, which runs no clean-up: each worker watches the
  trainer through a pidfd (no polling, no pid reuse), so no worker, forkserver or resource tracker is left.
- The forkserver they are forked from is shielded from SIGTERM too: torchrun stops a rank by signalling its
  whole process group, and a dead forkserver breaks the pool (BrokenProcessPool) under the checkpoint.

`run_ahead` keeps a pool busy a few jobs ahead of the consumer, results in submission order.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import select
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator, TypeVar

from .interrupt import Interrupt, result

Tag = TypeVar("Tag")


def _exit_when_gone(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (old kernel): check once a second instead
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(1.0)
    else:
        select.select([fd], [], [])  # readable once the process has exited
    os._exit(0)


def _init_worker(trainer_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_when_gone, args=(trainer_pid,), daemon=True, name="trainer-watch").start()


def augmentation_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers live exactly as long as this process (see the module doc)."""
    # forkserver: the stream's reader threads must not be forked into the workers.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", __name__])  # the forkserver imports this module: see the end
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),))


def run_ahead(pool: Executor | None, fn: Callable, jobs: Iterable[tuple[Tag, tuple]],
              ahead: int, interrupted: Interrupt = None) -> Iterator[tuple[Tag, Any]]:
    """(tag, fn(*args)) for each (tag, args) of `jobs`, in order, with up to `ahead` jobs submitted before their
    result is asked for (jobs are taken from `jobs` only as room frees up). pool None: run them here, in turn.
    A wait for a result ends in Interrupted once `interrupted()` is true."""
    in_flight: deque = deque()
    for tag, args in jobs:
        in_flight.append((tag, pool.submit(fn, *args) if pool else fn(*args)))
        if len(in_flight) >= ahead:
            tag, done = in_flight.popleft()
            yield tag, (result(done, interrupted) if pool else done)
    while in_flight:
        tag, done = in_flight.popleft()
        yield tag, (result(done, interrupted) if pool else done)


def _is_forkserver() -> bool:
    """This process is a multiprocessing forkserver (not a process forked from one)."""
    return any("multiprocessing.forkserver" in arg for arg in sys.orig_argv) and \
        mp.current_process().name == "MainProcess"


# The forkserver imports this module when it starts (augmentation_pool's preload list): there, and only there,
# SIGTERM is ignored. torchrun stops a rank by signalling its whole process group; a forkserver killed by that
# breaks the pool (BrokenProcessPool) while the trainer checkpoints. It still exits with the trainer (it
# watches a pipe from it), and the workers it forks inherit the ignored signal.
if _is_forkserver():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
