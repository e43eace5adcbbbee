"""CPU metrics read at each scrape: why a job is slower than its budget allows.

- `mocostream_cpu_throttled_periods_total` / `_seconds_total`: the cgroup's CPU quota stopped its processes
  (cpu.stat nr_throttled, throttled_usec; v1 throttled_time): the quota is too small for the threads.
- `mocostream_cpu_run_delay_seconds_total`: this process's threads were ready to run but waited for a CPU
  (/proc/self/task/*/schedstat): other processes hold the node's (or the affinity mask's) CPUs.
- `mocostream_cpu_used_seconds_total`: CPU time this process used, to compare with the budget.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from .cpu_budget import cgroup_dirs, throttling


class RunDelay:
    """Summed run delay of this process's threads, kept monotonic when threads exit."""

    def __init__(self, tasks: Path = Path("/proc/self/task")):
        self.tasks = tasks
        self.last: dict[str, int] = {}  # tid -> its latest run delay (ns)
        self.retired = 0  # of threads that have exited
        self.lock = threading.Lock()  # scrapes may overlap

    def seconds(self) -> float:
        with self.lock:
            return self._read()

    def _read(self) -> float:
        now = {}
        for task in self.tasks.iterdir() if self.tasks.is_dir() else ():
            try:
                now[task.name] = int((task / "schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):  # exited between listing and reading, or no schedstat
                continue
        self.retired += sum(v for tid, v in self.last.items() if tid not in now)
        self.last = now
        return (self.retired + sum(now.values())) / 1e9


class CpuCollector(Collector):
    def __init__(self, rank: str, cgroup: Path | None = None):
        self.rank = rank
        dirs = cgroup_dirs()
        self.cgroup = cgroup if cgroup is not None else (dirs[0] if dirs else None)
        self.delay = RunDelay()

    def collect(self):
        labels = [self.rank]
        periods = CounterMetricFamily("mocostream_cpu_throttled_periods", "CPU quota periods in which the "
                                      "cgroup's processes were throttled (cgroup cpu.stat nr_throttled).",
                                      labels=["rank"])
        seconds = CounterMetricFamily("mocostream_cpu_throttled_seconds", "Time the cgroup's processes were "
                                      "stopped by the CPU quota (cgroup cpu.stat throttled time).", labels=["rank"])
        throttled = throttling(self.cgroup) or (0, 0.0)  # no quota controller: never throttled
        periods.add_metric(labels, throttled[0])
        seconds.add_metric(labels, throttled[1])
        delay = CounterMetricFamily("mocostream_cpu_run_delay_seconds", "Time this process's threads were "
                                    "ready to run but waited for a CPU (busy node or affinity mask).",
                                    labels=["rank"])
        delay.add_metric(labels, self.delay.seconds())
        used = CounterMetricFamily("mocostream_cpu_used_seconds", "CPU time this process used (user + system).",
                                   labels=["rank"])
        times = os.times()
        used.add_metric(labels, times.user + times.system)
        return [periods, seconds, delay, used]
