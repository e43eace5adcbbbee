"""BatchNorm over interleaved sub-batches in one pass: the single-device form of Shuffle BN.

With several GPUs, each computes BN statistics over its own share of the batch, and Shuffle BN gives the
key encoder a different share than the query encoder saw. On one device, `SplitBatchNorm2d` computes the
statistics of `splits` sub-batches at once (sample i belongs to sub-batch i % splits), so the convolutions
still run on the whole batch:
* NCHW input: view the batch as N/splits samples of splits x C channels and call the plain batch norm;
* channels_last input (bf16 on CPU and GPU): that view does not exist in NHWC memory (it would cost two
  copies per BN and a layout change for the next convolution), so `_ChannelsLastSplitBN` normalises in
  place in NHWC memory, viewed as (N/splits, splits, H*W, C), with the statistics per (sub-batch, channel).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _sums(t: torch.Tensor) -> torch.Tensor:
    """(N/s, s, H*W, C) -> (s, C) fp32 sums. Summing H*W first (a middle-dimension reduction) is ~40x faster on
    CPU than one reduction over dims (0, 2); it accumulates in fp32 and rounds each partial sum once."""
    return t.sum(2).float().sum(0)


class _ChannelsLastSplitBN(torch.autograd.Function):
    """Training-mode batch norm of an NHWC-memory batch with statistics per (sub-batch i % s, channel)."""

    @staticmethod
    def forward(ctx, x, weight, bias, s: int, eps: float):
        n, c, h, w = x.shape
        count = (n // s) * h * w
        x4 = x.permute(0, 2, 3, 1).view(n // s, s, h * w, c)  # a view of the NHWC memory, no copy
        # Centre on the (x.dtype-rounded) mean before squaring: E[x^2] - E[x]^2 from bf16 partial sums would
        # lose the variance of any channel whose mean is large next to its spread.
        rough_mean = (_sums(x4) / count).to(x.dtype)
        d = x4 - rough_mean[:, None]
        offset = _sums(d) / count  # mean = rough_mean + offset
        var = (_sums(d * d) / count - offset * offset).clamp_(min=0)  # biased, as batch norm normalises with
        inv_std = torch.rsqrt(var + eps)
        scale = weight.float() * inv_std
        shift = bias.float() - offset * scale
        y = torch.empty_like(x, memory_format=torch.channels_last)
        torch.addcmul(shift[:, None].to(x.dtype), d, scale[:, None].to(x.dtype),
                      out=y.permute(0, 2, 3, 1).view(n // s, s, h * w, c))
        ctx.save_for_backward(d, offset, inv_std, weight)
        ctx.mark_non_differentiable(rough_mean, var)
        return y, rough_mean.float() + offset, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        d, offset, inv_std, weight = ctx.saved_tensors
        rows, s, hw, c = d.shape
        count = rows * hw
        dy4 = dy.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).view(rows, s, hw, c)
        sum_dy = _sums(dy4)
        sum_dy_xhat = (_sums(dy4 * d) - offset * sum_dy) * inv_std  # xhat = (d - offset) * inv_std
        # dx = w * inv_std * (dy - mean(dy) - xhat * mean(dy * xhat)), per (sub-batch, channel): dy*a + d*b + c
        a = weight.float() * inv_std
        b = -a * inv_std * sum_dy_xhat / count
        c0 = -a * sum_dy / count - b * offset
        dx = torch.empty_like(dy, memory_format=torch.channels_last)
        torch.addcmul(torch.addcmul(c0[:, None].to(d.dtype), d, b[:, None].to(d.dtype)), dy4,
                      a[:, None].to(d.dtype), out=dx.permute(0, 2, 3, 1).view(rows, s, hw, c))
        return dx, sum_dy_xhat.sum(0).to(weight.dtype), sum_dy.sum(0).to(weight.dtype), None, None


def _is_nhwc(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class SplitBatchNorm2d(nn.BatchNorm2d):
    def __init__(self, num_features: int, splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.splits = splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        s = self.splits
        if _is_nhwc(x):
            out, mean, var = _ChannelsLastSplitBN.apply(x, self.weight, self.bias, s, self.eps)
            count = (n // s) * h * w
            with torch.no_grad():  # the running statistics (unbiased variance, as batch norm keeps them)
                self.running_mean.lerp_(mean.mean(dim=0), self.momentum)
                self.running_var.lerp_((var * count / max(count - 1, 1)).mean(dim=0), self.momentum)
                self.num_batches_tracked += 1
            return out
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
