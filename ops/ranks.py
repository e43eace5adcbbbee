"""Work done once, on rank 0, for every rank of a torchrun job."""
from __future__ import annotations

import torch.distributed as dist


def on_one_rank(compute):
    """Run `compute` on rank 0 only and give every rank its result (or its one-line error)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return compute()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", compute())]
        except Exception as e:  # every rank raises it (none left waiting for the broadcast)
            box = [("error", e)]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value
