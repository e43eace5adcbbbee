"""LARS, as MoCo v3 trains ResNets with it (facebookresearch/moco-v3 `moco/optimizer.py`): SGD with momentum
whose step for each weight matrix / conv kernel is first scaled by a layer-wise trust ratio; 1-D parameters
(biases, BN and LayerNorm gains) get neither weight decay nor the scaling.

For a parameter p with p.ndim > 1, gradient g:   u = g + wd * p
                                                   u = u * eta * ||p|| / ||u||   (1 where ||p|| or ||u|| is 0)
for every parameter:                               mu = momentum * mu + u;   p = p - lr * mu

Like the fused SGD and AdamW the trainer uses, it skips a step on the device when `found_inf` (a 0-dim
tensor set by numerics.NonFiniteGuard, or a gradient scaler) is non-zero: neither p nor mu changes, and
no host sync is needed to decide it. The momentum buffers start at zero when the optimizer is built.
"""
from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    """LARS, no rate scaling or weight decay for normalization layers and biases (1-D parameters)."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure=None):
        found_inf = getattr(self, "found_inf", None)
        skip = found_inf is not None and found_inf.ndim == 0
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:  # not a bias or a normalization gain
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, g["trust_coefficient"] * param_norm / update_norm,
                                                one),
                                    one)
                    dp = dp.mul(q)
                mu = self.state[p]["mu"]
                new_mu = mu.mul(g["momentum"]).add_(dp)
                if skip:  # a non-finite step: keep p and mu as they are (decided on the device)
                    keep = found_inf.to(p.device) > 0
                    mu.copy_(torch.where(keep, mu, new_mu))
                    p.sub_(torch.where(keep, torch.zeros_like(new_mu), new_mu), alpha=g["lr"])
                else:
                    mu.copy_(new_mu)
                    p.sub_(new_mu, alpha=g["lr"])
        return None
