"""A command whose work has ended exits within a deadline, whatever is still in flight.

After a trainer's last checkpoint nothing it still does matters, yet interpreter exit joins every reader
thread, and a shard read stalled on storage takes up to --storage-timeout x (--storage-retries + 1) to give
up: minutes past a preemption's grace period. A daemon thread gives exit EXIT_DEADLINE_S; past it, it logs
where every thread is (faulthandler) and ends the process with the command's exit status.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading

log = logging.getLogger("mocostream")

EXIT_DEADLINE_S = 15.0  # a normal exit takes a second or two


def exit_within(seconds: float, status: int) -> None:
    """From now on, the process ends with `status` at the latest `seconds` later."""
    def watch():
        threading.Event().wait(seconds)  # a deadline, never set
        log.warning("exit still waiting %g s after the work ended (a stalled storage read?); ending the process "
                    "with status %d; the threads still running:", seconds, status)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stdout.flush()  # the summary, when stdout is a pipe
        sys.stderr.flush()
        os._exit(status)

    threading.Thread(target=watch, daemon=True, name="exit-deadline").start()
