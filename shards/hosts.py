"""Adaptive per-host concurrency: how many requests each host gets at once, learned from its answers.

The way TCP shares a link (AIMD), per host: a host starts at `start` connections. While it is the limit
(requests are waiting for it) and it answers quickly and cleanly, it gets more: half a connection more per
clean answer until its first back-off (x1.5 each round trip: a host that refuses above N sees at most
about N/2 refusals before that first back-off), then one more per round trip (`limit` clean answers).
On 429, 503, a timeout or a dropped connection the limit is halved, once per round trip (a request sent
before the last cut does not cut again; the download stage does not count a URL's second failure), and a
Retry-After pauses the whole host. A 429 says this client asked too much, a limit that stays: past the
level where the host last answered 429 it gets only one more per max(128, 16 x limit) clean answers, so a
host that refuses above N connections sees few refusals (503s, timeouts and resets are more often passing
trouble, so they only halve). The limit stays between 1 and `cap`. "Quickly": the time to the reply's
headers is under max(2 x the host's best, best + 0.1 s), so a host that slows down under load stops growing.

All methods run on the download stage's event loop (no locks). Idle hosts beyond `max_hosts` are forgotten
(oldest first), so memory follows the hosts in use, not every host of the list.
"""
from __future__ import annotations

import asyncio
import collections
import heapq
import math

OVERLOAD = ("429", "503", "timeout", "connection")  # the answers that make a host back off


class Gate:
    """One host's state."""
    __slots__ = ("name", "limit", "active", "waiters", "paused_until", "cut_at", "slow_start", "ceiling",
                 "best", "requests", "timer")

    def __init__(self, name: str, start: float):
        self.name, self.limit, self.active = name, start, 0
        self.waiters: collections.deque = collections.deque()
        self.paused_until = 0.0         # loop time before which no new request starts (Retry-After)
        self.cut_at = -math.inf         # loop time of the last back-off
        self.slow_start = True          # until the first back-off
        self.ceiling = 0.0              # connections in use at the last 429 (0: none to respect)
        self.best = math.inf            # the shortest time to a reply's headers seen
        self.requests = 0
        self.timer = None               # wakes the waiters when a pause ends

    def idle(self) -> bool:
        return not self.active and not self.waiters and self.timer is None


class Hosts:
    def __init__(self, start: int = 4, cap: int = 64, max_hosts: int = 4096):
        self.cap, self.start, self.max_hosts = cap, float(min(start, cap)), max_hosts
        self._gates: collections.OrderedDict[str, Gate] = collections.OrderedDict()
        self.backoffs: collections.Counter = collections.Counter()  # by cause (OVERLOAD)
        self.pauses = 0

    def gate(self, name: str) -> Gate:
        g = self._gates.get(name)
        if g is None:
            g = self._gates[name] = Gate(name, self.start)
            if len(self._gates) > self.max_hosts:
                self._forget()
        else:
            self._gates.move_to_end(name)
        return g

    def _forget(self) -> None:
        loop_time = asyncio.get_running_loop().time()
        for name in [n for n, g in self._gates.items() if g.idle() and g.paused_until <= loop_time]:
            if len(self._gates) <= self.max_hosts // 2:
                break
            del self._gates[name]

    async def acquire(self, g: Gate) -> float:
        """Wait for a connection slot of this host; returns the loop time it was granted."""
        loop = asyncio.get_running_loop()
        g.requests += 1
        if not g.waiters and g.active < int(g.limit) and g.paused_until <= loop.time():
            g.active += 1
            return loop.time()
        fut = loop.create_future()
        g.waiters.append(fut)
        self._wake(g)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted just before the cancel: hand the slot on
                g.active -= 1
                self._wake(g)
            elif fut in g.waiters:
                g.waiters.remove(fut)
            raise
        return loop.time()

    def release(self, g: Gate, started: float, signal: str, latency: float | None = None,
                pause: float | None = None) -> None:
        """A request sent at `started` ended. signal: "ok" (the host answered), one of OVERLOAD, or anything
        else for no change (nothing reached the host; a URL failing again); latency: seconds to the reply's
        headers (None: do not grow, e.g. the host was not what held requests back); pause: its Retry-After."""
        now = asyncio.get_running_loop().time()
        if pause and g.paused_until < now + pause:
            g.paused_until = now + pause
            self.pauses += 1
        if signal in OVERLOAD:
            self._back_off(g, now, started, signal)
        elif signal == "ok" and latency is not None:
            g.best = min(g.best, latency)
            waited_on = g.waiters or g.active >= int(g.limit)  # otherwise more connections would not be used
            if waited_on and latency <= max(2 * g.best, g.best + 0.1):
                self._grow(g)
        g.active -= 1
        self._wake(g)

    def _grow(self, g: Gate) -> None:
        if g.slow_start:
            step = 0.5
        elif g.ceiling and g.limit + 1 > g.ceiling:
            step = 1.0 / max(128.0, 16.0 * g.limit)
        else:
            step = 1.0 / g.limit
        g.limit = min(float(self.cap), g.limit + step)
        if g.ceiling and g.limit >= g.ceiling + 2:
            g.ceiling = 0.0  # it took more than where it pushed back: probe at the normal pace again

    def _back_off(self, g: Gate, now: float, started: float, cause: str) -> None:
        if started < g.cut_at:
            return  # sent before the last cut: that cut already answered this round trip
        level = min(g.limit, float(g.active))
        if cause == "429":
            g.ceiling = level
        g.limit = max(1.0, level / 2)
        g.slow_start = False
        g.cut_at = now
        self.backoffs[cause] += 1

    def _wake(self, g: Gate) -> None:
        loop = asyncio.get_running_loop()
        if g.paused_until > loop.time():
            if g.timer is None and g.waiters:
                g.timer = loop.call_at(g.paused_until, self._end_pause, g)
            return
        while g.waiters and g.active < int(g.limit):
            fut = g.waiters.popleft()
            if not fut.done():
                g.active += 1
                fut.set_result(None)

    def _end_pause(self, g: Gate) -> None:
        g.timer = None
        self._wake(g)

    def top(self, n: int) -> tuple[list[tuple[str, int, float, int]], int, int]:
        """([(host, connections open, limit, requests)] of the n hosts with the most requests, connections
        open to all the other hosts, hosts known)."""
        best = heapq.nlargest(n, self._gates.values(), key=lambda g: g.requests)
        names = {g.name for g in best}
        other = sum(g.active for g in self._gates.values() if g.name not in names)
        return [(g.name, g.active, g.limit, g.requests) for g in best], other, len(self._gates)
