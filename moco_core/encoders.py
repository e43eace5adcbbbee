"""Backbones for the query and key encoders: torchvision ResNets, with the small-image stem for 32-px data."""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch.nn as nn
import torchvision.models as tvm

ARCHS = ("resnet18", "resnet50", "resnet18_cifar", "resnet50_cifar")


def _resnet_cifar(resnet: Callable[..., nn.Module], **kwargs) -> nn.Module:
    """A ResNet whose stem keeps 32-px inputs at full resolution, as in the reference CIFAR demo:
    conv1 3x3 stride 1 (not 7x7 stride 2) and no max-pool (Identity, so `.fc` and the layer names stay)."""
    net = resnet(weights=None, **kwargs)
    net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": partial(tvm.resnet18, weights=None),
    "resnet50": partial(tvm.resnet50, weights=None),
    "resnet18_cifar": partial(_resnet_cifar, tvm.resnet18),
    "resnet50_cifar": partial(_resnet_cifar, tvm.resnet50),
}
assert tuple(_BUILDERS) == ARCHS


def build_encoder(arch: str) -> Callable[..., nn.Module]:
    """A constructor called like torchvision's, `build_encoder("resnet50")(num_classes=128)`, randomly initialised."""
    if arch not in ARCHS:
        raise ValueError(f"unknown encoder arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    return _BUILDERS[arch]
