"""The torch backend's augmentation worker processes, tied to the trainer's life.

- They ignore SIGINT and SIGTERM: Ctrl-C (or `timeout`, or a runtime signalling the whole process group)
  must reach the trainer only, which checkpoints and then shuts the pool down itself. Workers that died
  first would break the pool under the running step.
- They exit when the trainer is gone, even after `kill -9`, which runs no clean-up: each worker watches the
  trainer through a pidfd (no polling, no pid reuse), so no worker, forkserver or resource tracker is left.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import select
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor


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
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("forkserver"),
                               initializer=_init_worker, initargs=(os.getpid(),))
