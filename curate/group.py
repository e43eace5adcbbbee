"""The ranks of a curation job under torchrun (one process without): who does which shard, and the few points
where all ranks wait for each other. The process group is set up by the caller (ops), as for eval."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from mocostream.moco_core.distributed import on_rank0  # noqa: F401  (the curate stages' name for it)


def rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def mine(n: int) -> range:
    """The shard indices this rank works on: every world-th, from its rank (an even split of any list)."""
    rank, world = rank_world()
    return range(rank, n, world)


def sum_over_ranks(x: np.ndarray) -> np.ndarray:
    """The element-wise sum of an int64 array over the ranks (itself on one process)."""
    x = np.ascontiguousarray(x, np.int64)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    t = torch.from_numpy(x.copy())
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().numpy()
