"""moco_core: the MoCo algorithm in pure PyTorch (no I/O): encoders, momentum update, queue, Shuffle BN,
loss, schedules, numerical safety and the kNN monitor; MoCo v3 (builder_v3) with its ViTs (vits).

The names below load on first use (PEP 562): the command line reads the names of the encoders and schedules
(vocabulary.py, schedule.py) to list and check them without loading torch."""
from __future__ import annotations

from importlib import import_module

_EXPORTS = {  # module -> the names it gives the package
    "builder": ("MoCo", "add_mlp_head"),
    "builder_v3": ("MoCoV3", "build_mlp"),
    "encoders": ("build_encoder",),
    "vocabulary": ("ARCHS", "RESNETS", "VITS", "is_vit"),
    "knn": ("backbone_of", "extract_features", "knn_top1"),
    "loss": ("info_nce", "instance_accuracy"),
    "numerics": ("NonFiniteError", "NonFiniteGuard"),
    "optimizer": ("LARS",),
    "schedule": ("LR_SCHEDULES", "MOMENTUM_SCHEDULES", "OPTIMIZERS", "budget_lr", "build_optimizer", "cosine_lr",
                 "momentum_at", "scaled_lr", "step_lr"),
    "vits": ("sincos_position_embedding", "vit_base", "vit_small", "vit_tiny"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # the next lookup finds it without calling here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
