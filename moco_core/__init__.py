"""moco_core: the MoCo algorithm in pure PyTorch (no I/O): encoders, momentum update, queue, Shuffle BN,
loss, schedules, numerical safety and the kNN monitor; MoCo v3 (builder_v3) with its ViTs."""
from .builder import MoCo, add_mlp_head
from .builder_v3 import MoCoV3, build_mlp
from .encoders import ARCHS, build_encoder, is_vit
from .knn import backbone_of, extract_features, knn_top1
from .loss import info_nce, instance_accuracy
from .numerics import NonFiniteError, NonFiniteGuard
from .optimizer import LARS
from .schedule import (LR_SCHEDULES, MOMENTUM_SCHEDULES, OPTIMIZERS, budget_lr, build_optimizer, cosine_lr,
                       momentum_at, scaled_lr, step_lr)
from .vits import sincos_position_embedding, vit_base, vit_small, vit_tiny

__all__ = ["MoCo", "add_mlp_head", "MoCoV3", "build_mlp", "build_encoder", "is_vit", "ARCHS", "info_nce",
           "instance_accuracy", "scaled_lr", "cosine_lr", "step_lr", "budget_lr", "LR_SCHEDULES", "MOMENTUM_SCHEDULES",
           "momentum_at", "build_optimizer", "OPTIMIZERS", "LARS", "NonFiniteGuard", "NonFiniteError",
           "backbone_of", "extract_features", "knn_top1", "vit_tiny", "vit_small", "vit_base",
           "sincos_position_embedding"]
