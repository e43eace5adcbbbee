"""Fewer but busier compute threads when the CPUs are contended.

An OpenMP parallel region ends at a barrier: when a neighbour process takes one of the CPUs, every region
waits for the descheduled thread, and a 2-thread step beside one busy process ran 8x slower than alone while
a 1-thread step lost almost nothing. Which count is faster depends on the neighbours, who come and go, so
the tuner measures it: every so often it runs a short window of steps at the next thread count down (or up)
and keeps whichever gave the shorter steps. A slowdown of the current setting triggers a probe at once;
probes that change nothing come less and less often, so alone the cost stays around 1-2 % of the steps.
A probe that wins is run once more, against a fresh window of the current setting, before the switch: one
window slowed by something passing (a neighbour's burst, the first steps' warm-up) must not cost the run its
threads until the next probe.
"""
from __future__ import annotations

import logging
import statistics
from typing import Callable

log = logging.getLogger("mocostream.threads")


def ladder(max_threads: int) -> list[int]:
    """The thread counts tried: max, max/2, ..., 1."""
    counts, n = [], max(1, max_threads)
    while n > 1:
        counts.append(n)
        n //= 2
    return counts + [1]


class ThreadTuner:
    def __init__(self, max_threads: int, set_threads: Callable[[int], None], window: int = 8,
                 probe_window: int = 4, probe_every: int = 10, max_backoff: int = 8, margin: float = 1.08,
                 slowdown: float = 1.3):
        self.counts = ladder(max_threads)
        self.set_threads = set_threads
        self.window, self.probe_window = window, probe_window
        self.probe_every, self.max_backoff = probe_every, max_backoff
        self.margin, self.slowdown = margin, slowdown
        self.index = 0  # into counts: the current setting
        self.backoff = 1
        self.warming_up = True  # the first window (kernel selection, caches) tells nothing
        self.windows_since_probe = probe_every  # probe right after the first measured window
        self.baseline: float | None = None  # typical step time of the current setting
        self.last_window: float | None = None
        self.probing: int | None = None  # index of the count being probed
        self.down = True  # direction of the next probe
        self.confirming: int | None = None  # index of a count that won its probe once: probe it again first
        self.times: list[float] = []
        self.switches = 0

    @property
    def threads(self) -> int:
        return self.counts[self.index]

    def step(self, seconds: float) -> None:
        """Record one training step's wall time; may change the thread count for the next steps."""
        self.times.append(seconds)
        if len(self.times) < (self.probe_window if self.probing is not None else self.window) + 1:
            return
        typical = statistics.median(self.times[1:])  # the first step after a change pays for it
        self.times = []
        if self.probing is not None:
            self._end_probe(typical)
        else:
            self._end_window(typical)

    def _end_window(self, typical: float) -> None:
        if self.warming_up:
            self.warming_up = False
            return
        self.windows_since_probe += 1
        slowed = self.baseline is not None and typical > self.slowdown * self.baseline
        self.baseline = typical if self.baseline is None or slowed else min(self.baseline, typical)
        self.last_window = typical
        due = self.confirming is not None or self.windows_since_probe >= self.probe_every * self.backoff
        if len(self.counts) > 1 and (slowed or due):
            if slowed:
                self.backoff = 1
            self._start_probe()

    def _start_probe(self) -> None:
        if self.confirming is not None:  # the count that won last time, once more
            self.probing = self.confirming
        else:
            step = 1 if self.down else -1
            if not 0 <= self.index + step < len(self.counts):
                step = -step
            self.down = not self.down
            self.probing = self.index + step
        self.windows_since_probe = 0
        self.set_threads(self.counts[self.probing])

    def _end_probe(self, typical: float) -> None:
        probed, self.probing = self.probing, None
        won = typical * self.margin < self.last_window
        if won and self.confirming == probed:
            log.info("intra-op threads %d -> %d: steps %.0f ms -> %.0f ms (CPUs contended or freed)",
                     self.threads, self.counts[probed], 1000 * self.last_window, 1000 * typical)
            self.down = probed > self.index  # keep going the same way first
            self.index, self.baseline, self.backoff = probed, typical, 1
            self.confirming = None
            self.switches += 1
            return
        self.confirming = probed if won else None  # a first win: back for one window, then probe it again
        if not won:
            self.backoff = min(self.max_backoff, 2 * self.backoff)
        self.set_threads(self.threads)
