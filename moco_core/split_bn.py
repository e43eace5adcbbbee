"""BatchNorm over interleaved sub-batches in one pass: the single-device form of Shuffle BN.

With several GPUs, each computes BN statistics over its own share of the batch, and Shuffle BN gives the
key encoder a different share than the query encoder saw. On one device, `SplitBatchNorm2d` computes the
statistics of `splits` sub-batches at once (sample i belongs to sub-batch i % splits) by viewing the batch
as N/splits samples of splits x C channels, so the convolutions still run on the whole batch.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SplitBatchNorm2d(nn.BatchNorm2d):
    def __init__(self, num_features: int, splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.splits = splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        s = self.splits
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)  # updated in place by batch_norm
        out = F.batch_norm(x.reshape(n // s, s * c, h, w), mean, var, self.weight.repeat(s), self.bias.repeat(s),
                           True, self.momentum, self.eps)
        with torch.no_grad():  # the running statistics: the average over the sub-batches
            self.running_mean.copy_(mean.view(s, c).mean(dim=0))
            self.running_var.copy_(var.view(s, c).mean(dim=0))
            self.num_batches_tracked += 1
        return out.reshape(n, c, h, w)


def split_batch_norms(module: nn.Module, splits: int) -> nn.Module:
    """Replace every BatchNorm2d in `module` by a SplitBatchNorm2d with the same parameters and buffers
    (state-dict names unchanged, so checkpoints and the key encoder copy are unaffected)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm2d(child.num_features, splits, eps=child.eps, momentum=child.momentum,
                                     affine=child.affine, track_running_stats=child.track_running_stats)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split.to(child.weight.device))
        else:
            split_batch_norms(child, splits)
    return module
