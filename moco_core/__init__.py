"""moco_core: the MoCo algorithm in pure PyTorch (no I/O): encoders, momentum update, queue, Shuffle BN, loss, schedule."""
from .builder import MoCo
from .encoders import ARCHS, build_encoder
from .loss import info_nce, instance_accuracy
from .schedule import build_optimizer, cosine_lr, scaled_lr

__all__ = ["MoCo", "build_encoder", "ARCHS", "info_nce", "instance_accuracy", "scaled_lr", "cosine_lr",
           "build_optimizer"]
