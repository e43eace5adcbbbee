"""The pipeline's configs derived from the TrainConfig, not re-typed: a field whose name the TrainConfig
shares is copied, the few that differ are translated here, and a field that is neither (nor left at its
default on purpose) is an error, so a new loader or storage setting cannot be silently dropped."""
from __future__ import annotations

import dataclasses

import torch

from mocostream.pipeline.loader import LoaderConfig
from mocostream.pipeline.storage import StorageConfig

from .config import TrainConfig

# StorageConfig settings that are not training options: their defaults hold.
STORAGE_DEFAULTS_KEPT = {"backoff_seconds", "max_backoff_seconds", "connect_timeout", "verify_sha256"}


def derive(cls, cfg: TrainConfig, translated: dict, prefix: str = "", kept: frozenset | set = frozenset()):
    """`cls` built from `cfg`: field `x` from option `prefix + x`, overridden by `translated`."""
    names = [f.name for f in dataclasses.fields(cls)]
    shared = {n: getattr(cfg, prefix + n) for n in names if prefix + n in TrainConfig.__dataclass_fields__}
    missing = sorted(set(names) - set(shared) - set(translated) - set(kept))
    if missing:
        raise TypeError(f"{cls.__name__} fields {missing} are neither TrainConfig options nor translated")
    return cls(**{**shared, **translated})


def storage_config(cfg: TrainConfig) -> StorageConfig:
    return derive(StorageConfig, cfg, {"read_timeout": cfg.storage_timeout,
                                       "allow_external_shards": cfg.allow_external_shards},
                  prefix="storage_", kept=STORAGE_DEFAULTS_KEPT)


def loader_config(cfg: TrainConfig, storage: StorageConfig, rank: int, world: int,
                  device: torch.device, local_rank: int, **decided) -> LoaderConfig:
    """This rank's loader settings; the storage settings are shared with the trainer's start-up calls.
    `decided`: values the trainer worked out itself (e.g. workers sized from the CPUs it may use)."""
    gpu = device.type == "cuda"
    return derive(LoaderConfig, cfg, {
        "rank": rank, "world": world, "storage": storage,
        "device": "gpu" if gpu else "cpu",  # DALI's word for CUDA
        "device_id": local_rank if gpu else None,
        "read_ahead_bytes": cfg.read_ahead_mb << 20,
        "preflight": cfg.preflight_check,
        **decided,
    })
