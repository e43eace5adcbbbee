"""Vision Transformers as MoCo v3 builds them (facebookresearch/moco-v3 `vits.py`), on timm's VisionTransformer.

What MoCo v3 changes in a ViT, for training stability:
* a fixed 2-D sin-cos position embedding (not learned); the class token's entry is zero;
* `stop_grad_conv1`: the patch projection keeps its random initialisation and gets no gradient;
* the initialisation: xavier-uniform for every Linear, the q, k and v thirds of `qkv` each as its own matrix;
  the patch projection xavier-uniform as a (3 * p * p) -> D linear map; zero biases; class token N(0, 1e-6).

Why timm (pinned in pyproject.toml) rather than torchvision's VisionTransformer: the reference builds on timm,
so the parameter names are the reference's and timm's own (reference checkpoints and timm weights load as they
are, and `mocostream export --format timm` is the identity); timm's model exposes the patch embedding's grid,
the class token and the position embedding as plain attributes and takes the reference's settings (LayerNorm
eps 1e-6, qkv bias) as arguments, and its `weight_init="moco"` is the reference's Linear initialisation.
torchvision's model hides the position embedding inside its encoder and names every weight differently
(`mocostream export --format torchvision` converts to its names).

ViT-S here is the paper's: 384 wide, depth 12, 12 heads (timm's `vit_small_patch16_224` has 6).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from .vocabulary import VITS

VIT_SIZES = {  # embed_dim, depth, num_heads, patch_size
    "vit_tiny": (192, 12, 3, 4),  # timm's ViT-Ti widths with 4-px patches: an 8x8 grid on 32-px images, for CPUs
    "vit_small": (384, 12, 12, 16),
    "vit_base": (768, 12, 12, 16),
}
assert tuple(VIT_SIZES) == VITS  # the names the command line offers (vocabulary.py)


def sincos_position_embedding(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(1, 1 + h * w, dim): the class token's zeros, then per patch [sin(a w), cos(a w), sin(b w), cos(b w)] with
    w = temperature^(-i / (dim / 4)), i < dim / 4. As in the reference, (a, b) come from meshgrid(w-range,
    h-range) flattened, so on a square grid a is the patch's row and b its column."""
    h, w = grid
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                    indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w = grid_w.flatten()[:, None] * omega[None, :]
    out_h = grid_h.flatten()[:, None] * omega[None, :]
    pos = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), pos])[None]


class VisionTransformerMoCo(VisionTransformer):
    """timm's VisionTransformer with MoCo v3's position embedding, initialisation and frozen patch projection."""

    def __init__(self, stop_grad_conv1: bool = False, **kwargs):
        super().__init__(weight_init="moco", **kwargs)  # xavier Linear, per-third qkv, zero biases, cls N(0, 1e-6)
        if self.num_prefix_tokens != 1:
            raise ValueError("MoCo v3's ViT has exactly one prefix token, the class token")
        # fixed 2-D sin-cos position embedding
        self.pos_embed = nn.Parameter(sincos_position_embedding(self.patch_embed.grid_size, self.embed_dim),
                                      requires_grad=False)
        # the patch projection as a (3 * p * p) -> D linear map, xavier-uniform
        proj = self.patch_embed.proj
        val = math.sqrt(6.0 / float(proj.in_channels * math.prod(proj.kernel_size) + self.embed_dim))
        nn.init.uniform_(proj.weight, -val, val)
        nn.init.zeros_(proj.bias)
        if stop_grad_conv1:  # a random patch projection: the fix for the instability of early training
            proj.weight.requires_grad = False
            proj.bias.requires_grad = False


def _vit(name: str, img_size: int = 224, stop_grad_conv1: bool = False, **kwargs) -> VisionTransformerMoCo:
    embed_dim, depth, num_heads, patch_size = VIT_SIZES[name]
    return VisionTransformerMoCo(stop_grad_conv1=stop_grad_conv1, img_size=img_size, patch_size=patch_size,
                                 embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4, qkv_bias=True,
                                 norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def vit_tiny(**kwargs) -> VisionTransformerMoCo:
    """192 wide, depth 12, 3 heads, 4-px patches: for 32-px images on CPUs."""
    return _vit("vit_tiny", **kwargs)


def vit_small(**kwargs) -> VisionTransformerMoCo:
    """ViT-S/16 as in MoCo v3: 384 wide, depth 12, 12 heads (~21.7M parameters without the head)."""
    return _vit("vit_small", **kwargs)


def vit_base(**kwargs) -> VisionTransformerMoCo:
    """ViT-B/16: 768 wide, depth 12, 12 heads (~85.8M parameters without the head)."""
    return _vit("vit_base", **kwargs)
