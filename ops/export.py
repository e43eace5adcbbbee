"""`mocostream export`: a training checkpoint's backbone in the formats people fine-tune from.

  torchvision  a plain state_dict (torch.save): `torchvision.models.<arch>()` loads it with strict=True once its
               `fc` is replaced (fc.weight and fc.bias are missing by design: the MoCo head is not a classifier).
               The CIFAR-stem and narrow archs are mocostream's own builders; the report says how to build them.
               A ViT's names become those of torchvision's VisionTransformer (conv_proj, class_token,
               encoder.pos_embedding, encoder.layers.encoder_layer_N.*, encoder.ln; heads missing by design).
  timm         a plain state_dict with timm's names: the ResNets' are torchvision's, the ViTs' are timm's
               VisionTransformer's own (MoCo v3's ViTs are built on it).
  safetensors  the same tensors, with metadata (arch, recipe, step, images seen, source sha256).
  detectron2   the names detectron2's ResNet uses (stem, res2..res5, convN.norm, shortcut), as the reference
               MoCo repository's conversion writes them: a pickle {"model": numpy arrays, "__author__",
               "matching_heuristics": True}, which detectron2's checkpointer reads from a `.pkl` file.
"""
from __future__ import annotations

import io
import os
import pickle

import torch

from mocostream.moco_core.vocabulary import is_vit
from mocostream.pipeline.filesystems import Storage, is_remote

from .export_formats import FORMATS
from .weights import WeightsError, backbone_state, read_checkpoint

TORCHVISION_ARCHS = ("resnet18", "resnet50")  # the mocostream archs that are torchvision's own models
MISSING_BY_DESIGN = ["fc.weight", "fc.bias"]


def detectron2_name(name: str) -> str:
    """torchvision ResNet name -> detectron2's: layerN -> res(N+1), stem layers under `stem.`,
    bnN -> convN.norm, downsample.0/.1 -> shortcut / shortcut.norm."""
    parts = name.split(".")
    if parts[0].startswith("layer"):
        parts[0] = f"res{int(parts[0][len('layer'):]) + 1}"
    else:
        parts.insert(0, "stem")
    out: list[str] = []
    i = 0
    while i < len(parts):
        part = parts[i]
        if part in ("bn1", "bn2", "bn3"):
            out += [f"conv{part[2]}", "norm"]
        elif part == "downsample":
            out += ["shortcut"] if parts[i + 1] == "0" else ["shortcut", "norm"]
            i += 1
        else:
            out.append(part)
        i += 1
    return ".".join(out)


def torchvision_vit_name(name: str) -> str:
    """timm ViT name -> torchvision VisionTransformer's (its MLP block is Linear, GELU, Dropout, Linear, Dropout)."""
    fixed = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding", "norm.weight": "encoder.ln.weight",
             "norm.bias": "encoder.ln.bias"}
    if name in fixed:
        return fixed[name]
    if name.startswith("patch_embed.proj."):
        return "conv_proj." + name.rsplit(".", 1)[1]
    _, i, rest = name.split(".", 2)  # blocks.<i>.<rest>
    rest = {"norm1.weight": "ln_1.weight", "norm1.bias": "ln_1.bias", "norm2.weight": "ln_2.weight",
            "norm2.bias": "ln_2.bias", "attn.qkv.weight": "self_attention.in_proj_weight",
            "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj.weight": "self_attention.out_proj.weight",
            "attn.proj.bias": "self_attention.out_proj.bias", "mlp.fc1.weight": "mlp.0.weight",
            "mlp.fc1.bias": "mlp.0.bias", "mlp.fc2.weight": "mlp.3.weight", "mlp.fc2.bias": "mlp.3.bias"}[rest]
    return f"encoder.layers.encoder_layer_{i}.{rest}"


def _torch_bytes(weights: dict, meta: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    return buffer.getvalue()


def _torchvision_bytes(weights: dict, meta: dict) -> bytes:
    if is_vit(str(meta["arch"])):
        weights = {torchvision_vit_name(k): v for k, v in weights.items()}
    return _torch_bytes(weights, meta)


def _safetensors_bytes(weights: dict, meta: dict) -> bytes:
    from safetensors.torch import save

    return save(weights, metadata={k: str(v) for k, v in meta.items()})


def _detectron2_bytes(weights: dict, meta: dict) -> bytes:
    if meta["arch"] not in TORCHVISION_ARCHS:
        raise WeightsError(f"detectron2 has no ResNet with the stem of {meta['arch']}; export "
                           f"{' or '.join(TORCHVISION_ARCHS)} checkpoints to it, or use --format torchvision")
    model = {detectron2_name(k): v.cpu().numpy() for k, v in weights.items()}
    return pickle.dumps({"model": model, "__author__": "mocostream", "matching_heuristics": True})


WRITERS = {"torchvision": _torchvision_bytes, "timm": _torch_bytes, "safetensors": _safetensors_bytes,
           "detectron2": _detectron2_bytes}


def write_file(out: str, data: bytes, *, storage: Storage) -> None:
    """A local file appears complete under its name (temporary name, then rename); on object storage a PUT is
    (retried as `storage` says)."""
    if is_remote(out):
        storage.write_bytes(out, data)
        return
    _, path = storage.filesystem(out)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def vit_constructor(fmt: str, arch: str, image_size: int) -> str:
    from mocostream.moco_core.vits import VIT_SIZES

    d, depth, heads, patch = VIT_SIZES[arch]
    if fmt == "torchvision":
        return (f"torchvision.models.VisionTransformer(image_size={image_size}, patch_size={patch}, "
                f"num_layers={depth}, num_heads={heads}, hidden_dim={d}, mlp_dim={4 * d}); "
                f"m.heads = torch.nn.Identity()")
    return (f"timm.models.VisionTransformer(img_size={image_size}, patch_size={patch}, embed_dim={d}, depth={depth}, "
            f"num_heads={heads}, num_classes=0)")


def how_to_load(fmt: str, arch: str, out: str, image_size: int = 224) -> str:
    if fmt == "detectron2":
        return f"detectron2: MODEL.WEIGHTS {out} (R-{arch[len('resnet'):]})"
    load = (f"torch.load('{out}', weights_only=True)" if fmt in ("torchvision", "timm")
            else f"safetensors.torch.load_file('{out}')")
    if is_vit(arch):
        return f"m = {vit_constructor(fmt, arch, image_size)}; m.load_state_dict({load})"
    build = (f"torchvision.models.{arch}()" if arch in TORCHVISION_ARCHS
             else f"mocostream.moco_core.build_encoder('{arch}')()")
    return f"m = {build}; m.fc = torch.nn.Identity(); m.load_state_dict({load})"


def missing_by_design(fmt: str, arch: str) -> list[str]:
    if fmt == "detectron2":
        return []
    if is_vit(arch):
        return ["heads.head.weight", "heads.head.bias"] if fmt == "torchvision" else ["head.weight", "head.bias"]
    return MISSING_BY_DESIGN


def export(path: str, out: str, fmt: str, encoder: str = "query", storage: Storage | None = None) -> dict:
    """Write the backbone of the checkpoint at `path` (file, folder or s3:// prefix) to `out`; returns a report.
    `storage`: reads and writes both (default: the default storage settings)."""
    storage = storage or Storage()
    if fmt not in FORMATS:
        raise WeightsError(f"unknown --format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "detectron2" and not out.endswith(".pkl"):
        raise WeightsError("detectron2 reads this format from a .pkl file: give --out NAME.pkl")
    state, file, sha256 = read_checkpoint(path, storage=storage)
    cfg = state.get("config", {})
    step, world = int(state.get("step", 0)), int(state.get("world", 1))
    meta = {"format": "mocostream-backbone", "arch": cfg.get("arch", "unknown"), "recipe": cfg.get("recipe", ""),
            "encoder": encoder, "step": step, "images_seen": step * int(cfg.get("batch_size", 0)) * world,
            "source": file, "source_sha256": sha256}
    weights = backbone_state(state, encoder)
    write_file(out, WRITERS[fmt](weights, meta), storage=storage)
    return {"out": out, "format": fmt, **meta, "tensors": len(weights),
            "missing_by_design": missing_by_design(fmt, meta["arch"]),
            "load_with": how_to_load(fmt, meta["arch"], out, int(cfg.get("image_size") or 224))}
