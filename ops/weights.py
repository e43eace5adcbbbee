"""Backbone weights in and out of a training checkpoint.

Reading never executes anything: torch files load with `weights_only=True` (plain tensors and containers; a
pickle naming any other object is refused), safetensors files hold tensors only. The backbone is an encoder
without its projection head (`fc.*`, the v2 MLP included; a ViT's `head.*`, MoCo v3's projector): what a user
fine-tunes, and what `--init-from` fills.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import struct
import warnings

import torch
import torch.nn as nn

from mocostream.pipeline.filesystems import Storage, is_remote

from . import checkpoint

log = logging.getLogger("mocostream.weights")

HEADS = ("fc.", "head.")  # torchvision and timm ResNets name their classifier `fc`, timm ViTs `head`; MoCo puts its
# projection head there
ENCODERS = {"query": ("encoder_q.", "base_encoder."), "key": ("encoder_k.", "momentum_encoder.")}  # MoCo, MoCoV3


def encoder_of(model: nn.Module, which: str = "query") -> nn.Module:
    """The query (MoCo v3: base) or key (momentum) encoder of a MoCo or MoCoV3 model."""
    v1_v2, v3 = (prefix[:-1] for prefix in ENCODERS[which])
    return getattr(model, v1_v2) if hasattr(model, v1_v2) else getattr(model, v3)


class WeightsError(ValueError):
    user_error = True


def resolve_checkpoint(path: str, *, storage: Storage) -> str:
    """A checkpoint file, or the latest checkpoint in a folder / s3:// prefix."""
    if path.endswith(".pt"):
        return path
    file = checkpoint.latest(path, storage=storage)
    if file is None:
        raise WeightsError(f"no checkpoint in {path}")
    scheme = path.split("://", 1)[0] + "://" if "://" in path else ""
    return file if "://" in file or not scheme else scheme + file  # listings drop the s3:// scheme


def _read(path: str, storage: Storage) -> bytes:
    try:
        return storage.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError):
        raise WeightsError(f"not found: {path}") from None


def safe_torch_load(data: bytes, name: str):
    """torch.load of plain tensors and containers only: a file asking to run or import code is refused."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols: the error says enough
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (not a torch file), EOFError, ...
        # e.g. "unsupported GLOBAL posix.system whose module posix is blocked."
        reason = re.search(r"unsupported[^\n]*", str(e), re.IGNORECASE)
        raise WeightsError(f"{name}: refused: not a file of plain tensors "
                           f"({reason.group(0).strip() if reason else type(e).__name__}; nothing in it was run)") from None


def is_training_checkpoint(obj) -> bool:
    return (isinstance(obj, dict) and isinstance(obj.get("model"), dict)
            and any(str(k).startswith(ENCODERS["query"]) for k in obj["model"]))


def encoder_prefix(state: dict, encoder: str = "query") -> str:
    """`encoder_q.` / `encoder_k.` (MoCo v1/v2) or `base_encoder.` / `momentum_encoder.` (v3) in this checkpoint."""
    v1_v2, v3 = ENCODERS[encoder]
    return v1_v2 if any(str(k).startswith(v1_v2) for k in state["model"]) else v3


def read_checkpoint(path: str, *, storage: Storage) -> tuple[dict, str, str]:
    """(state, file, sha256 of the file's bytes) of a mocostream training checkpoint; anything else is refused."""
    file = resolve_checkpoint(path, storage=storage)
    data = _read(file, storage)
    state = safe_torch_load(data, file)
    if not is_training_checkpoint(state):
        raise WeightsError(f"{file} is not a mocostream training checkpoint (no encoder_q weights in it)")
    return state, file, hashlib.sha256(data).hexdigest()


def backbone_state(state: dict, encoder: str = "query") -> dict[str, torch.Tensor]:
    """One encoder's backbone from a training checkpoint, with torchvision's parameter names."""
    prefix = encoder_prefix(state, encoder)
    return {k[len(prefix):]: v.detach().contiguous().clone() for k, v in state["model"].items()
            if k.startswith(prefix) and not k[len(prefix):].startswith(HEADS)}


def _is_safetensors(data: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header."""
    if len(data) < 9:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    return data[8:9] == b"{" and 8 + n <= len(data)


def _plain_state_dict(obj, path: str) -> dict[str, torch.Tensor]:
    """The backbone tensors of a loaded file: a state_dict, one wrapped in `state_dict`/`model` (timm and
    others), DDP's `module.` prefixes removed, or a mocostream training checkpoint (its query encoder)."""
    if is_training_checkpoint(obj):
        return backbone_state(obj)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} holds no state_dict of tensors")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return {k: v for k, v in obj.items() if not k.startswith(HEADS)}


def read_backbone(path: str, *, storage: Storage) -> dict[str, torch.Tensor]:
    """Backbone weights from a local or s3:// file: safetensors, or a torch state_dict (torchvision, timm,
    a file `mocostream export` wrote)."""
    return read_backbone_file(path, storage=storage)[0]


def _safetensors_metadata(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    try:
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def read_backbone_file(path: str, *, storage: Storage) -> tuple[dict[str, torch.Tensor], str | None, str]:
    """(backbone weights, the arch the file names or None, sha256 of the file): the arch of a training
    checkpoint's config or of the metadata `mocostream export` writes into safetensors."""
    data = _read(path, storage)
    digest = hashlib.sha256(data).hexdigest()
    if _is_safetensors(data):
        from safetensors.torch import load

        return _plain_state_dict(load(data), path), _safetensors_metadata(data).get("arch"), digest
    obj = safe_torch_load(data, path)
    arch = (obj.get("config") or {}).get("arch") if is_training_checkpoint(obj) else None
    return _plain_state_dict(obj, path), arch, digest


def weights_file(path: str, *, storage: Storage) -> str:
    """A file as it is; a checkpoint folder (or s3:// prefix): its latest checkpoint."""
    fs, where = storage.filesystem(path)
    folder = storage.retrying(f"list {path}", lambda: fs.isdir(where)) if is_remote(path) else fs.isdir(where)
    return resolve_checkpoint(path, storage=storage) if folder else path


def load_frozen_backbone(path: str, arch: str | None, *, storage: Storage) -> tuple[nn.Module, dict]:
    """The backbone (projection head removed) of a weights file, or of a checkpoint folder's latest checkpoint,
    as an eval-mode module without gradients, and what it is: {arch, file, sha256}. `arch`: needed when the file
    does not name one (a torchvision or timm state_dict); checked against the file's own otherwise."""
    from mocostream.moco_core import ARCHS, backbone_of, build_encoder

    path = weights_file(path, storage=storage)
    weights, named, digest = read_backbone_file(path, storage=storage)
    if arch and named and arch != named:
        raise WeightsError(f"{path} holds a {named} backbone, not --arch {arch}")
    arch = arch or named
    if not arch:
        raise WeightsError(f"{path} does not say which encoder it is: give --arch ({', '.join(ARCHS)})")
    encoder = build_encoder(arch)(num_classes=1)
    target = {k: v for k, v in encoder.state_dict().items() if not k.startswith(HEADS)}
    problems = _mismatch(target, weights)
    if problems:
        raise WeightsError(f"{path} does not fit --arch {arch}: {'; '.join(problems)}")
    encoder.load_state_dict(weights, strict=False)  # strict on the backbone: checked just above
    backbone = backbone_of(encoder).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone, {"arch": arch, "file": path, "sha256": digest}


def _mismatch(target: dict, weights: dict) -> list[str]:
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

    missing = sorted(set(target) - set(weights))
    unexpected = sorted(set(weights) - set(target))
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(target[k].shape)}"
              for k in target if k in weights and weights[k].shape != target[k].shape]
    return ([f"{len(missing)} missing ({some(missing)})"] if missing else []) + \
        ([f"{len(unexpected)} unexpected ({some(unexpected)})"] if unexpected else []) + \
        ([f"{len(shapes)} shapes differ (file vs model: {some(shapes)})"] if shapes else [])


def init_backbones(model: nn.Module, path: str, arch: str, *, storage: Storage) -> None:
    """Both encoders of a MoCo model start from the backbone in `path`; the projection head keeps its fresh
    initialisation, the key encoder becomes a copy of the query encoder (head and BN statistics included)."""
    weights = read_backbone(path, storage=storage)
    query, key = encoder_of(model, "query"), encoder_of(model, "key")
    target = {k: v for k, v in query.state_dict().items() if not k.startswith(HEADS)}
    problems = _mismatch(target, weights)
    if problems:
        raise WeightsError(f"--init-from {path} does not fit --arch {arch}: {'; '.join(problems)}")
    query.load_state_dict(weights, strict=False)  # strict on the backbone: checked just above
    key.load_state_dict(query.state_dict())
    log.info("both encoders start from the backbone in %s (%d tensors; head and queue fresh)", path, len(weights))
