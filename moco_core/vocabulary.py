"""The encoder names, in a module that imports nothing, so the command line lists and checks them without
loading torch (encoders.py builds each one; the schedules' names are in schedule.py, which loads torch only
to build the optimizer)."""
from __future__ import annotations

RESNETS = ("resnet18", "resnet50", "resnet18_cifar", "resnet50_cifar", "resnet18_cifar_half", "resnet18_cifar_small")
VITS = ("vit_tiny", "vit_small", "vit_base")  # MoCo v3's Vision Transformers (vits.py)
ARCHS = RESNETS + VITS


def is_vit(arch: str) -> bool:
    return arch in VITS

