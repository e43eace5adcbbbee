"""Waiting for data that a stop request can cut short.

A preempted trainer (SIGTERM) must checkpoint within the grace period even when the data it waits for is late:
a stalled storage read may take --storage-timeout times --storage-retries to give up. The stream's waits for a
shard read or an augmentation job go through `result`, which gives up with `Interrupted` as soon as the
consumer's `interrupted()` says so (checked twice a second); the trainer then stops at the step it has reached.
"""
from __future__ import annotations

from concurrent.futures import Future, wait
from typing import Callable, Optional

POLL_S = 0.5  # how often a wait looks at the stop request

Interrupt = Optional[Callable[[], bool]]


class Interrupted(Exception):
    """The consumer asked to stop while the stream waited for data."""


def result(future: Future, interrupted: Interrupt = None):
    """future.result(), or Interrupted once `interrupted()` is true while the future is not done."""
    if interrupted is not None:
        while not future.done():
            if interrupted():
                raise Interrupted
            wait([future], timeout=POLL_S)
    return future.result()
