"""The trainer's thread pools, sized from its CPU budget once at start-up (see ops/cpu_budget.py)."""
from __future__ import annotations

import logging
import os

import torch

from mocostream.pipeline.vocabulary import OPENCV

from .config import TrainConfig
from .cpu_budget import CpuBudget, ThreadSplit, detect_budget, split_threads
from .thread_tuner import ThreadTuner

log = logging.getLogger("mocostream.cpu")


def apply_cpu_budget(cfg: TrainConfig, on_gpu: bool, local_ranks: int | None = None
                     ) -> tuple[CpuBudget, ThreadSplit, ThreadTuner | None]:
    """Detect the budget, set torch's thread counts; returns the split (the loader's thread count comes from
    it) and, on CPU with more than one compute thread, the tuner the step loop feeds. log_cpu_budget says it."""
    budget = detect_budget(cfg.cpus, local_ranks)
    split = split_threads(budget, on_gpu, intra_op=cfg.intra_op_threads or omp_num_threads(), loader=cfg.workers)
    torch.set_num_threads(split.intra_op)
    try:
        torch.set_num_interop_threads(split.interop)
    except RuntimeError:  # only settable before the first inter-op work; an embedding caller may have done some
        log.debug("inter-op threads already started: left at %d", torch.get_num_interop_threads())
    tuner = None
    if cfg.adapt_threads and not on_gpu and split.intra_op > 1:
        tuner = ThreadTuner(split.intra_op, torch.set_num_threads)
    return budget, split, tuner


def log_cpu_budget(budget: CpuBudget, split: ThreadSplit, backend: str) -> None:
    """One line at start: the budget, where each limit came from, and the split (the loader's own line says
    which backend it runs and why)."""
    log.info("%s -> %d intra-op threads, %d loader %s, OpenMP wait %s", budget.describe(),
             split.intra_op, split.loader, "workers" if backend == OPENCV else "threads", openmp_wait())


def openmp_wait() -> str:
    """The OpenMP wait setting in force, for the start-up line."""
    policy, spin = os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT")
    if policy or spin:
        return " ".join(x for x in (policy and f"policy {policy}", spin and f"spin count {spin}") if x)
    return "runtime default"


def omp_num_threads() -> int | None:
    """OMP_NUM_THREADS, when set to a count, chooses the compute threads as it always has (torchrun sets 1)."""
    raw = os.environ.get("OMP_NUM_THREADS", "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else None
