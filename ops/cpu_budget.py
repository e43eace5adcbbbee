"""The CPUs this process may really use, and how its thread pools share them.

A pod with a CPU limit of 4 on a 64-core node sees 64 CPUs in its affinity mask; sizing every pool (torch's
intra-op threads, DALI's threads, augmentation workers, image checks) to 64 gets the job throttled by the
quota, and sizing each pool to the whole machine oversubscribes it even without a quota. The budget is the
smallest of: the affinity mask, the cgroup CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cfs_period_us`,
the tightest one on the way to the root), and an explicit `--cpus`; divided among the ranks that share the
node (LOCAL_WORLD_SIZE).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


class CpuBudgetError(ValueError):
    user_error = True


@dataclass(frozen=True)
class CpuBudget:
    cpus: int  # whole CPUs for this rank (at least 1)
    limits: dict  # source -> CPUs it allows the process: affinity, cgroup, flag
    ranks: int  # ranks sharing those CPUs

    def describe(self) -> str:
        sources = ", ".join(f"{name} {value:g}" for name, value in self.limits.items())
        share = f" / {self.ranks} local ranks" if self.ranks > 1 else ""
        return f"CPU budget: {self.cpus} per rank (min of {sources}{share})"


def parse_cpus(value) -> float | None:
    """--cpus as a positive number (fractions as a quota gives them), or None when not set."""
    if value in (None, ""):
        return None
    try:
        cpus = float(value)
    except (TypeError, ValueError):
        raise CpuBudgetError(f"--cpus must be a positive number of CPUs, got {value!r}") from None
    if not cpus > 0 or math.isinf(cpus):
        raise CpuBudgetError(f"--cpus must be a positive number of CPUs, got {value!r}")
    return cpus


def cgroup_dirs(root: Path = CGROUP_ROOT, proc_cgroup: str = "/proc/self/cgroup") -> list[Path]:
    """This process's cgroup folders holding CPU controller files, innermost first, up to the root:
    the v2 unified hierarchy's path, or the v1 `cpu` controller's."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy (on a hybrid host its root has no cpu controller)
            base = root if (root / "cgroup.controllers").exists() else None
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own mount
            base = next((root / name for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu") if (root / name).is_dir()),
                        None)
        else:
            continue
        if base is None:
            continue
        inner = base / path.lstrip("/")
        folder = inner if inner.is_dir() else base  # in a container the path may name the host's view
        return [folder, *[p for p in folder.parents if p.is_relative_to(base)]]
    return []


def quota_of(folder: Path) -> float | None:
    """CPUs a cgroup folder's quota allows, or None when it has none (`max`, -1) or no such files."""
    try:
        if (folder / "cpu.max").exists():
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if (folder / "cpu.cfs_quota_us").exists():
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
            return None if quota < 0 else quota / period
    except (OSError, ValueError):
        return None
    return None


def cgroup_quota(dirs: list[Path]) -> float | None:
    quotas = [q for q in (quota_of(d) for d in dirs) if q is not None]
    return min(quotas) if quotas else None


def throttling(folder: Path | None) -> tuple[int, float] | None:
    """(periods throttled, seconds throttled) from a cgroup's cpu.stat (v2 throttled_usec, v1 throttled_time
    in ns), or None when there is no such file."""
    if folder is None:
        return None
    try:
        stat = dict(line.split() for line in (folder / "cpu.stat").read_text().splitlines() if line.strip())
    except (OSError, ValueError):
        return None
    if "throttled_usec" in stat:
        seconds = int(stat["throttled_usec"]) / 1e6
    elif "throttled_time" in stat:
        seconds = int(stat["throttled_time"]) / 1e9
    else:
        return None
    return int(stat.get("nr_throttled", 0)), seconds


def affinity_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def detect_budget(cpus=None, local_ranks: int | None = None, dirs: list[Path] | None = None,
                  affinity: int | None = None) -> CpuBudget:
    """The budget of one rank. `cpus`: the --cpus flag (None: not set); `local_ranks`: ranks on this node
    (default: $LOCAL_WORLD_SIZE, else 1); `dirs`: cgroup folders (default: this process's)."""
    limits: dict = {"affinity": affinity if affinity is not None else affinity_cpus()}
    quota = cgroup_quota(cgroup_dirs() if dirs is None else dirs)
    if quota is not None:
        limits["cgroup quota"] = quota
    flag = parse_cpus(cpus)
    if flag is not None:
        limits["--cpus"] = flag
    ranks = local_ranks if local_ranks is not None else local_world_size()
    # a quota of 1.5 CPUs runs 2 threads half-throttled: round down, but never below one CPU per rank
    per_rank = max(1, math.floor(min(limits.values()) / ranks + 1e-9))
    return CpuBudget(cpus=per_rank, limits=limits, ranks=ranks)


def local_world_size() -> int:
    raw = os.environ.get("LOCAL_WORLD_SIZE", "1")
    try:
        return max(1, int(raw))
    except ValueError:
        raise CpuBudgetError(f"LOCAL_WORLD_SIZE must be an integer, got {raw!r}") from None


@dataclass(frozen=True)
class ThreadSplit:
    intra_op: int  # torch intra-op threads (the training step's compute)
    interop: int  # torch inter-op threads
    loader: int  # DALI CPU threads / opencv-backend augmentation processes (also the image-check threads)


def split_threads(budget: CpuBudget, on_gpu: bool, intra_op: int | None = None,
                  loader: int | None = None) -> ThreadSplit:
    """Every pool sized from the same budget; `intra_op` / `loader` override their pool alone.

    On CPU the step and the loader take turns more than they overlap (DALI prefetches a batch while the step
    runs), so both get the budget: at 2 CPUs that is today's 2 + 2, measured fastest alone; what keeps it
    fast beside a busy neighbour is passive OpenMP waiting and the thread tuner (ops/thread_tuner.py).
    On a GPU the CPU work is the loader's: the step needs one thread or a few to launch kernels."""
    n = budget.cpus
    default_intra = min(4, max(1, n // 8)) if on_gpu else n
    default_loader = max(1, n - default_intra) if on_gpu else n
    return ThreadSplit(intra_op=intra_op or default_intra, interop=1, loader=default_loader if loader is None
                       else loader)


def shard_tool_defaults(budget: CpuBudget) -> tuple[int, int]:
    """(decode workers, downloads in flight) of `shards create`: one decode process per CPU; downloads are
    I/O, 32 per CPU (img2dataset keeps 32-256 per process), between 32 and 256."""
    return budget.cpus, min(256, max(32, 32 * budget.cpus))


OPENMP_SPIN_COUNT = "10000"  # libgomp's default is 300000 (about 0.1-0.3 ms of spinning at every wait)


def short_openmp_spin(environ=os.environ) -> bool:
    """GOMP_SPINCOUNT=10000 unless the user chose a wait policy (OMP_WAIT_POLICY or GOMP_SPINCOUNT): an idle
    OpenMP thread spins a few microseconds, then sleeps. Beside a busy process that leaves the CPU to the loader
    and the neighbour (as OMP_WAIT_POLICY=PASSIVE does), while alone the threads still catch the next parallel
    region without a wake-up, which PASSIVE (no spin at all) costs ~15 % of the steps' speed on 2 cores
    (BENCHMARKS.md). The runtime reads it once, when torch loads it, so this runs before torch is imported;
    returns whether it was set."""
    import sys

    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ or "torch" in sys.modules:
        return False
    environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT
    return True
