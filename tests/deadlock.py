"""Run a command with a bounded wait that, when the command hangs, says where each of its processes is.

`run_watched(cmd, bound)` waits for the command (Popen.wait in short slices, i.e. polling proc.poll()) until it
exits or `bound` seconds pass. It fails early, after `stall` seconds instead of `bound`, on the hang that
bounded socket buffers make possible: the main process and one of its descendants both asleep in a socket
send (kernel wait channel sock_alloc_send_pskb, unix_stream_sendmsg, ...) while no process of the tree uses
any CPU. Either way the failure report lists, per process, its command line, state, kernel wait channel and
kernel stack (/proc/PID/wchan, /proc/PID/stack), then the main process's Python stacks (PYTHONFAULTHANDLER
is set: SIGABRT makes it print every thread's stack before it dies). stdout and stderr go to files, never to
pipes (a full pipe would be a hang of the watcher's own making).
"""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

SEND_WAITS = ("sock_alloc_send_pskb", "unix_stream_sendmsg", "sk_stream_wait_memory", "unix_wait_for_peer",
              "pipe_write")


def _read(path: str, limit: int = 4000) -> str:
    try:
        return Path(path).read_text(errors="replace")[:limit].strip()
    except OSError as exc:
        return f"({exc.strerror})"


def descendants(pid: int) -> list[int]:
    parents = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            parents[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            pass
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [c for c, p in parents.items() if p == parent]
        found += kids
        frontier += kids
    return found


def _sample(pid: int) -> tuple[str, str, int]:
    """(state, kernel wait channel, CPU clock ticks used) of one process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], _read(f"/proc/{pid}/wchan"), int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return "gone", "", 0


def where(pids: list[int]) -> str:
    """Each process's command line, state, wait channel and kernel stack."""
    out = []
    for pid in pids:
        state, wchan, ticks = _sample(pid)
        cmd = _read(f"/proc/{pid}/cmdline", 300).replace("\0", " ")
        out.append(f"--- pid {pid} state {state} wchan {wchan} cpu ticks {ticks}: {cmd}\n"
                   f"{_read(f'/proc/{pid}/stack', 1500)}")
    return "\n".join(out)


class Hung(AssertionError):
    pass


def _kib(path: str, field: str) -> int:
    try:
        with open(path) as f:
            return next((int(line.split()[1]) for line in f if line.startswith(field)), 0)
    except OSError:
        return 0


class TreeMemory:
    """Peaks over the samples of a process tree: the sum of RSS (pages shared between processes, e.g. a forked
    worker's inherited libraries, counted once per process: an upper bound), the sum of PSS (shared pages
    split between their users: what the tree really holds), and each process's own peak (VmHWM)."""

    def __init__(self):
        self.rss_sum = self.pss_sum = 0
        self.hwm: dict[int, int] = {}

    def sample(self, tree: list[int]) -> None:
        self.rss_sum = max(self.rss_sum, sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in tree) << 10)
        self.pss_sum = max(self.pss_sum, sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in tree) << 10)
        for p in tree:
            self.hwm[p] = max(self.hwm.get(p, 0), _kib(f"/proc/{p}/status", "VmHWM:") << 10)

    def as_dict(self) -> dict:
        return {"tree_peak_rss_sum_bytes": self.rss_sum, "tree_peak_pss_sum_bytes": self.pss_sum,
                "processes": len(self.hwm), "sum_of_process_peaks_bytes": sum(self.hwm.values())}


def run_watched(cmd: list[str], bound: float = 120.0, stall: float = 5.0, env: dict | None = None,
                cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run `cmd`; its CompletedProcess (stdout, stderr as text; `.memory`: the tree's TreeMemory, sampled
    every 0.5 s) when it exits within `bound` seconds, else raise Hung with the report (after `stall` seconds
    of a send-send deadlock)."""
    env = {**(env or os.environ), "PYTHONFAULTHANDLER": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, cwd=cwd, start_new_session=True)
        started = time.monotonic()
        quiet_since, last_ticks, memory = None, None, TreeMemory()
        try:
            while True:
                try:
                    proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
                tree = [proc.pid] + descendants(proc.pid)
                memory.sample(tree)
                samples = [_sample(p) for p in tree]
                ticks = sum(s[2] for s in samples)
                sending = [s[1] in SEND_WAITS for s in samples]
                deadlocked = sending[0] and any(sending[1:]) and ticks == last_ticks
                quiet_since = (quiet_since or time.monotonic()) if deadlocked else None
                last_ticks = ticks
                waited = time.monotonic() - started
                if waited > bound or (quiet_since is not None and time.monotonic() - quiet_since > stall):
                    what = ("deadlocked: the main process and a child both blocked in a socket send, no CPU used "
                            f"for {stall:g} s" if waited <= bound else f"still running after {bound:g} s")
                    report = where(tree)
                    os.kill(proc.pid, signal.SIGABRT)  # faulthandler: the Python stacks of every thread
                    proc.wait(30)
                    raise Hung(f"{' '.join(map(str, cmd))[:300]}\n{what} ({waited:.0f} s)\n{report}\n"
                               f"--- main process stderr (Python stacks):\n{_read(str(err), 20000)[-6000:]}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # workers left behind by a killed main process
            except ProcessLookupError:
                pass
        done = subprocess.CompletedProcess(cmd, proc.returncode, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))
        done.memory = memory
        return done
