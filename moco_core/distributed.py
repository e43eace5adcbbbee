"""Collectives for MoCo under DDP: gather keys from all ranks, and the Shuffle BN batch shuffle.

All of these also work in a single process (torch.distributed not initialised): world size 1, rank 0.
They run on the tensor's own device, so gloo (CPU) and NCCL (CUDA) both work.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, in rank order.

    *** No gradient flows back through all_gather. *** Every rank must pass the same shape.
    """
    n = world_size()
    if n == 1:
        return tensor
    tensor = tensor.contiguous()
    tensors_gather = [torch.empty_like(tensor) for _ in range(n)]
    dist.all_gather(tensors_gather, tensor)
    return torch.cat(tensors_gather, dim=0)


@torch.no_grad()
def batch_shuffle_ddp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle the global batch across ranks; return this rank's share and the index that undoes it.

    *** Only for BN in the key encoder: its statistics then mix samples from all ranks. ***
    """
    batch_size_this = x.shape[0]
    x_gather = concat_all_gather(x)
    batch_size_all = x_gather.shape[0]
    num_ranks = batch_size_all // batch_size_this

    # random permutation, made on rank 0 and broadcast so every rank agrees
    idx_shuffle = torch.randperm(batch_size_all, device=x.device)
    if num_ranks > 1:
        dist.broadcast(idx_shuffle, src=0)

    # index for restoring the original order
    idx_unshuffle = torch.argsort(idx_shuffle)

    idx_this = idx_shuffle.view(num_ranks, -1)[rank()]
    return x_gather[idx_this], idx_unshuffle


@torch.no_grad()
def batch_unshuffle_ddp(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo `batch_shuffle_ddp`: this rank gets back the outputs of its own samples, in their original order."""
    batch_size_this = x.shape[0]
    x_gather = concat_all_gather(x)
    num_ranks = x_gather.shape[0] // batch_size_this

    idx_this = idx_unshuffle.view(num_ranks, -1)[rank()]
    return x_gather[idx_this]


def on_rank0(compute):
    """Run `compute` on rank 0 only and give every rank its result, or its error (setup work such as listing
    shards: done once, and no rank is left waiting on a rank that failed)."""
    if world_size() == 1:
        return compute()
    box = [None]
    if rank() == 0:
        try:
            box = [("ok", compute())]
        except Exception as e:  # every rank raises it
            box = [("error", e)]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value
