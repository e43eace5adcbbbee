"""The loader's names, each list defined here once and used everywhere else (the loader's checks, the CLI's
choices, the config, the benchmarks), and the rule that picks a backend. Imports nothing, so the CLI can
offer the choices without loading torch. (The reasons a sample is skipped are listed in skip_log.py.)"""
from __future__ import annotations

# facebookresearch/moco's augmentation recipes (augment_reference.py holds them as PIL + torchvision)
RECIPES = ("moco_v1", "moco_v2", "moco_v3")

# What turns samples into two augmented views (backends.py)
DALI = "dali"  # DALI's graph: on the GPU when there is one, else its CPU operators
OPENCV = "opencv"  # OpenCV (and PIL's resize) in worker processes: the faster loader on CPU
AUTO = "auto"  # DALI when the loader feeds a CUDA GPU, OpenCV on CPU
BACKENDS = (DALI, OPENCV)
BACKEND_CHOICES = (AUTO, *BACKENDS)
BACKEND_ALIASES = {"torch": OPENCV}  # old names, still accepted (with a notice)

# When the DALI loader checks each image first (image_check.py): auto skips shards `shards create` validated
PREFLIGHT = ("auto", "always", "never")


def alias_notice(name: str) -> str | None:
    """The one-line notice for an old backend name, None for a current one."""
    new = BACKEND_ALIASES.get(name)
    return f"backend {name!r} is a deprecated name: use {new!r} (the same backend)" if new else None


def pick_backend(name: str, on_gpu: bool) -> tuple[str, str]:
    """(backend, why) for a chosen name: auto is DALI for a CUDA GPU and OpenCV on CPU (there OpenCV's
    workers load ~1.3-1.7x faster than DALI's CPU operators, BENCHMARKS.md); an old name is its new one."""
    name = BACKEND_ALIASES.get(name, name)
    if name == AUTO:
        return (DALI, "auto: a CUDA GPU") if on_gpu else (OPENCV, "auto: no CUDA GPU, OpenCV is the faster "
                                                                  "loader on CPU")
    if name == DALI and not on_gpu:
        return DALI, "as asked; without a GPU the opencv backend loads ~1.3-1.7x faster: BENCHMARKS.md"
    return name, "as asked"
