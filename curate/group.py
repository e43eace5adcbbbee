"""The ranks of a curation job under torchrun (one process without): who does which shard, and the few points
where all ranks wait for each other. The process group is set up by the caller (ops), as for eval."""
from __future__ import annotations

import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def on_rank0(compute):
    """`compute()` on rank 0; every rank gets its result (or raises its error)."""
    rank, world = rank_world()
    if world == 1:
        return compute()
    box = [None]
    if rank == 0:
        try:
            box = [("ok", compute())]
        except Exception as e:  # every rank raises it: none is left waiting
            box = [("error", e)]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def mine(n: int) -> range:
    """The shard indices this rank works on: every world-th, from its rank (an even split of any list)."""
    rank, world = rank_world()
    return range(rank, n, world)
