"""MoCo v3: a base encoder with a projector and a predictor, a momentum encoder, no queue
(Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", arXiv 2104.02057).

Follows facebookresearch/moco-v3 `moco/builder.py` (MoCo, MoCo_ResNet, MoCo_ViT), to be read side by side
with it. The keys of a query are the momentum encoder's features of the other view, for the whole global
batch (gathered across ranks); the positive of query i of rank r is key r*N + i, and the loss is the
symmetrised InfoNCE scaled by 2T. Changes: one class for both backbone kinds (a torchvision-style `fc`
head: ResNet, 2-layer projector; a timm-style `head`: ViT, 3-layer projector); the momentum update is one
fused pass; the logits are computed in fp32 under autocast (bf16 has 8 bits of mantissa: at T 0.2 a logit
would move in steps of ~0.04); and the last step's instance accuracy is kept for the metrics.

Batch norm: each view goes through the encoders as its own batch, so BN statistics are per view, as in the
reference. Under DDP the reference converts every BN to SyncBatchNorm (statistics over the global batch of
one view); ops/train.py does so on CUDA. SyncBatchNorm has no CPU kernel (gloo): there each rank normalises
over its own share of the view, as BN does on a multi-GPU run without SyncBN.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import concat_all_gather, rank


def build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    """Linear (no bias) - BN - ReLU for each hidden layer; the last Linear is followed by a BN without affine
    (SimCLR's design, with gamma removed as well), or by nothing when last_bn is False."""
    mlp: list[nn.Module] = []
    for layer in range(num_layers):
        dim1 = input_dim if layer == 0 else mlp_dim
        dim2 = output_dim if layer == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if layer < num_layers - 1:
            mlp.append(nn.BatchNorm1d(dim2))
            mlp.append(nn.ReLU(inplace=True))
        elif last_bn:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


def head_name(encoder: nn.Module) -> str:
    """The attribute holding the encoder's classifier, which MoCo v3 replaces by its projector: `fc`
    (torchvision ResNets) or `head` (timm ViTs)."""
    for name in ("fc", "head"):
        if isinstance(getattr(encoder, name, None), (nn.Linear, nn.Sequential)):
            return name
    raise ValueError("MoCoV3 expects a torchvision-style ResNet (`fc`) or a timm-style ViT (`head`)")


class MoCoV3(nn.Module):
    """
    Build a MoCo v3 model with: a base encoder, a momentum encoder, and a predictor
    https://arxiv.org/abs/2104.02057
    """

    def __init__(self, base_encoder: Callable[..., nn.Module], dim: int = 256, mlp_dim: int = 4096, T: float = 1.0):
        """
        dim: feature dimension (default: 256)
        mlp_dim: hidden dimension in MLPs (default: 4096)
        T: softmax temperature (default: 1.0)
        """
        super().__init__()
        if dim < 1 or mlp_dim < 1:
            raise ValueError(f"MoCoV3 needs dim >= 1 and mlp_dim >= 1, got dim={dim}, mlp_dim={mlp_dim}")
        self.T = T
        self.accuracy = torch.zeros(())  # of the last forward: share of queries whose positive key scored highest
        self._accuracies: list[torch.Tensor] = []

        # build encoders; num_classes is the hidden MLP dimension
        self.base_encoder = base_encoder(num_classes=mlp_dim)
        self.momentum_encoder = base_encoder(num_classes=mlp_dim)
        self._build_projector_and_predictor_mlps(dim, mlp_dim)

        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            param_m.data.copy_(param_b.data)  # initialize
            param_m.requires_grad = False  # not updated by gradient

    def _build_projector_and_predictor_mlps(self, dim: int, mlp_dim: int) -> None:
        head = head_name(self.base_encoder)
        vit = head == "head"
        hidden_dim = getattr(self.base_encoder, head).weight.shape[1]
        # projectors (replace the original classifier): ResNet 2 layers, ViT 3 layers
        setattr(self.base_encoder, head, build_mlp(3 if vit else 2, hidden_dim, mlp_dim, dim))
        setattr(self.momentum_encoder, head, build_mlp(3 if vit else 2, hidden_dim, mlp_dim, dim))
        # predictor: 2 layers; the reference ends the ResNet one without BN, the ViT one with it
        self.predictor = build_mlp(2, dim, mlp_dim, dim, last_bn=vit)

    @torch.no_grad()
    def _update_momentum_encoder(self, m: float) -> None:
        """Momentum update of the momentum encoder: theta_m <- m * theta_m + (1 - m) * theta_b, one fused pass"""
        params_b = list(self.base_encoder.parameters())
        params_m = list(self.momentum_encoder.parameters())
        torch._foreach_mul_(params_m, m)
        torch._foreach_add_(params_m, params_b, alpha=1.0 - m)

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # normalize (in fp32 at least: see the module docstring)
        q = F.normalize(q.to(torch.promote_types(q.dtype, torch.float32)), dim=1)
        k = F.normalize(k.to(torch.promote_types(k.dtype, torch.float32)), dim=1)
        # gather all targets
        k = concat_all_gather(k)
        # Einstein sum is more intuitive
        logits = torch.einsum("nc,mc->nm", [q, k]) / self.T
        N = logits.shape[0]  # batch size per rank
        labels = torch.arange(N, dtype=torch.long, device=logits.device) + N * rank()
        self._accuracies.append((logits.detach().argmax(dim=1) == labels).float().mean())
        return F.cross_entropy(logits, labels) * (2 * self.T)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
        """
        Input:
            x1: first views of images
            x2: second views of images
            m: moco momentum
        Output:
            loss
        """
        if x1.shape[0] != x2.shape[0]:
            raise ValueError(f"x1 and x2 must hold the same number of images, got {x1.shape[0]} and {x2.shape[0]}")

        # compute features
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))

        with torch.no_grad():  # no gradient
            self._update_momentum_encoder(m)  # update the momentum encoder

            # compute momentum features as targets
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)

        self._accuracies = []
        loss = self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)
        self.accuracy = torch.stack(self._accuracies).mean()  # a device tensor: read at log steps only
        return loss
