"""Backbones for the query and key encoders: torchvision ResNets, with the small-image stem for 32-px data, and
MoCo v3's Vision Transformers (vits.py)."""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch.nn as nn
import torchvision.models as tvm

from . import vits
from .vocabulary import ARCHS, is_vit


def _resnet_cifar(resnet: Callable[..., nn.Module], **kwargs) -> nn.Module:
    """A ResNet whose stem keeps 32-px inputs at full resolution, as in the reference CIFAR demo:
    conv1 3x3 stride 1 (not 7x7 stride 2) and no max-pool (Identity, so `.fc` and the layer names stay)."""
    net = resnet(weights=None, **kwargs)
    net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


class _NarrowResNet(tvm.ResNet):
    """torchvision's ResNet with stage widths (w, 2w, 4w, 8w) instead of (64, 128, 256, 512), and the CIFAR
    stem: a quarter of ResNet-18's compute at half its width, for CPU-sized budgets on 32-px images.
    `pool` adds a 2x2 max-pool after the stem, so the stages see 16/8/4/2 px instead of 32/16/8/4: another 4x less
    compute, yet a finer grid than the ImageNet stem, which leaves a 32-px image at 1x1 before the pool."""

    def __init__(self, layers: list[int], width: int, pool: bool = False, num_classes: int = 1000,
                 zero_init_residual: bool = False):
        nn.Module.__init__(self)  # ResNet.__init__ hard-codes the widths; its helpers are reused below
        self._norm_layer, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, 1, 1, 64
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.layer1 = self._make_layer(tvm.resnet.BasicBlock, width, layers[0])
        self.layer2 = self._make_layer(tvm.resnet.BasicBlock, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(tvm.resnet.BasicBlock, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(tvm.resnet.BasicBlock, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:  # each residual branch starts as zero: every block the identity (as torchvision)
            for m in self.modules():
                if isinstance(m, tvm.resnet.BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": partial(tvm.resnet18, weights=None),
    "resnet50": partial(tvm.resnet50, weights=None),
    "resnet18_cifar": partial(_resnet_cifar, tvm.resnet18),
    "resnet50_cifar": partial(_resnet_cifar, tvm.resnet50),
    "resnet18_cifar_half": partial(_NarrowResNet, [2, 2, 2, 2], 32),
    "resnet18_cifar_small": partial(_NarrowResNet, [2, 2, 2, 2], 32, True),
    "vit_tiny": vits.vit_tiny,
    "vit_small": vits.vit_small,
    "vit_base": vits.vit_base,
}
assert tuple(_BUILDERS) == ARCHS


def build_encoder(arch: str, image_size: int | None = None, **kwargs) -> Callable[..., nn.Module]:
    """A constructor called like torchvision's, `build_encoder("resnet50")(num_classes=128)`, randomly initialised.
    ViTs are built for `image_size` (default 224: their position embedding has one entry per patch); `kwargs`
    go to the builder (`stop_grad_conv1=True` for a ViT, `zero_init_residual=True` for a ResNet)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown encoder arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    if is_vit(arch):
        kwargs["img_size"] = image_size or 224
    return partial(_BUILDERS[arch], **kwargs) if kwargs else _BUILDERS[arch]
