"""Evaluation of a pretrained encoder on a labelled set: weighted kNN, and a linear probe.

Both use the query encoder's backbone (projection head removed), frozen and in eval mode. Features are
computed once (no augmentation, so they cannot change), then the kNN vote or the linear classifier runs
on them. A fingerprint of the backbone's weights and buffers taken before and after proves it did not change.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mocostream.moco_core import MoCoV3, add_mlp_head, backbone_of, build_encoder, extract_features, is_vit, knn_top1
from mocostream.moco_core.distributed import on_rank0
from mocostream.pipeline.augment_reference import normalize
from mocostream.pipeline.filesystems import Storage
from mocostream.pipeline.labeled import LabeledImages, knn_sets
from mocostream.pipeline.labeled_stream import labeled_units, shard_class_names, split_specs

from .weights import encoder_prefix, read_checkpoint

log = logging.getLogger("mocostream.eval")


class EvalError(ValueError):
    user_error = True


def fingerprint(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (running BN statistics included)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_query_encoder(path: str | None, arch: str | None = None, image_size: int | None = None, *,
                       storage: Storage) -> tuple[nn.Module, dict]:
    """The query encoder (MoCo v3: the base encoder) of a training checkpoint (file, or the latest in a folder /
    s3 prefix), or a randomly initialised `arch` when `path` is None (the baseline every result is compared
    with). A ViT is built for the image size it trained on (or `image_size`)."""
    if path is None:
        if not arch:
            raise EvalError("give --checkpoint, or --arch for a randomly initialised encoder")
        torch.manual_seed(0)
        return build_encoder(arch, image_size)(num_classes=128), {"arch": arch, "step": 0, "image_size": image_size}
    state, file, _ = read_checkpoint(path, storage=storage)
    cfg = state.get("config", {})
    arch = cfg.get("arch", arch or "resnet50")
    info = {"arch": arch, "step": int(state.get("step", 0)), "checkpoint": file, "image_size": cfg.get("image_size")}
    if encoder_prefix(state) == "base_encoder.":  # MoCo v3: the encoder with its projector, as trained
        model = MoCoV3(build_encoder(arch, cfg.get("image_size")), dim=cfg.get("dim", 256),
                       mlp_dim=cfg.get("mlp_dim", 4096))
        model.load_state_dict(state["model"])
        return model.base_encoder, info
    encoder = build_encoder(arch, cfg.get("image_size"))(num_classes=cfg.get("dim", 128))
    if cfg.get("mlp"):
        add_mlp_head(encoder)
    prefix = "encoder_q."
    weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    encoder.load_state_dict(weights)
    return encoder, info


def feature_dim(encoder: nn.Module) -> int:
    """Width of the backbone's features: the input of a ResNet's `fc` (or v2 MLP), a ViT's embedding."""
    if hasattr(encoder, "embed_dim"):
        return encoder.embed_dim
    return next(m for m in encoder.fc.modules() if isinstance(m, nn.Linear)).in_features


def features(backbone: nn.Module, images: LabeledImages, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch_size):
        x = normalize(images.images[i:i + batch_size].to(device))
        out.append(extract_features(backbone, x, batch_size, device))
    return torch.cat(out)


def knn_eval(backbone: nn.Module, bank: LabeledImages, queries: LabeledImages, device: torch.device,
             k: int = 200, t: float = 0.1) -> float:
    return knn_top1(features(backbone, bank, device), bank.labels, features(backbone, queries, device),
                    queries.labels, k=k, t=t)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 classes: int, epochs: int = 100, lr: float = 0.1, batch_size: int = 256, seed: int = 0) -> float:
    """A linear classifier on frozen features (SGD, cosine lr, batch-norm-free): top-1 on the test set."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(train_x.shape[1], classes)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        return float((head(test_x).argmax(1) == test_y).float().mean())


def frozen_backbone(checkpoint_path: str | None, arch: str | None, dev: torch.device,
                    image_size: int | None = None, *, storage: Storage) -> tuple[nn.Module, dict, int]:
    """(backbone without gradients, what it is, its feature dimension)."""
    encoder, info = load_query_encoder(checkpoint_path, arch, image_size, storage=storage)
    backbone = backbone_of(encoder).to(dev)
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone, info, feature_dim(encoder)


def _checked_unchanged(backbone: nn.Module, before: str) -> str:
    after = fingerprint(backbone)
    if after != before:  # the evaluation must never move the representation it measures
        raise RuntimeError("the backbone changed during evaluation")
    return after


def evaluate(kind: str, data: str, checkpoint_path: str | None = None, arch: str | None = None,
             image_size: int | None = None, device: str = "cpu", k: int = 200, t: float = 0.1,
             max_per_class: int | None = None, epochs: int = 100, lr: float = 0.1,
             storage: Storage | None = None) -> dict:
    """`kind` is knn or linear (on cached features). Returns the accuracy and what it was measured on.
    `storage` reads the checkpoint and the data (default: the default storage settings)."""
    t0 = time.perf_counter()
    dev, storage = torch.device(device), storage or Storage()
    backbone, info, _ = frozen_backbone(checkpoint_path, arch, dev, image_size, storage=storage)
    vit_size = info.get("image_size") if is_vit(str(info.get("arch"))) else None  # its patch grid is fixed
    size = image_size or vit_size or (32 if str(info.get("arch", "")).endswith("_cifar") else 224)
    bank, queries = knn_sets(data, size, max_per_class, storage=storage)
    before = fingerprint(backbone)
    if kind == "knn":
        top1 = knn_eval(backbone, bank, queries, dev, k, t)
    elif kind == "linear":
        train_x, test_x = features(backbone, bank, dev), features(backbone, queries, dev)
        top1 = linear_probe(train_x, bank.labels, test_x, queries.labels, len(bank.classes), epochs, lr)
    else:
        raise EvalError(f"unknown evaluation {kind!r}; choose knn or linear")
    after = _checked_unchanged(backbone, before)
    return {"eval": kind, "top1": top1, **info, "image_size": size, "train_images": len(bank),
            "test_images": len(queries), "classes": len(bank.classes), "backbone_sha256": after,
            "backbone_unchanged": True, "seconds": round(time.perf_counter() - t0, 2),
            "skipped": dict(bank.skipped + queries.skipped)}


def evaluate_reference(data: str, checkpoint_path: str | None = None, arch: str | None = None,
                       image_size: int = 224, device: str = "auto", epochs: int = 100, lr: float = 30.0,
                       batch_size: int = 256, workers: int = 2, classes: int | None = None,
                       out: str | None = None, seed: int = 0, storage: Storage | None = None) -> dict | None:
    """The reference linear protocol (see linear_reference), on one device or under torchrun; rank 0 writes the
    classifier to `out` and returns the results, the other ranks return None. `storage` reads and writes."""
    from .linear_reference import reference_linear

    t0 = time.perf_counter()
    dev, storage = _eval_device(device), storage or Storage()
    (train_spec, train_part), (val_spec, val_part) = split_specs(data)
    train_units, names = labeled_units(train_spec, train_part, seed, storage=storage)
    val_units, _ = labeled_units(val_spec, val_part, seed, storage=storage)  # indexed by the training set's names
    if names is None:
        names = on_rank0(lambda: shard_class_names(train_units, storage=storage))
    classes = classes or (len(names) if names else None)
    if not classes:
        raise EvalError("labelled shards with class indices do not name their classes: give --num-classes")
    backbone, info, dim = frozen_backbone(checkpoint_path, arch, dev, image_size, storage=storage)
    before = fingerprint(backbone)
    result, head = reference_linear(backbone, dim, classes, train_units, val_units, image_size, dev, epochs, lr,
                                    batch_size, workers, seed, names, storage=storage)
    after = _checked_unchanged(backbone, before)
    rank = dist.get_rank() if dist.is_initialized() else 0
    result = {"eval": "linear", "protocol": "reference", **result, **info, "image_size": image_size,
              "epochs": epochs, "lr": lr, "batch_size": batch_size, "classes": classes,
              "world": dist.get_world_size() if dist.is_initialized() else 1, "backbone_sha256": after,
              "backbone_unchanged": True, "seconds": round(time.perf_counter() - t0, 2)}
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank != 0:
        return None
    if out:
        write_classifier(out, head, result, names, storage=storage)
        result["classifier"] = out
    return result


def _eval_device(device: str) -> torch.device:
    """The device; under torchrun also the process group (NCCL on GPU, gloo on CPU)."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dev


def write_classifier(out: str, head: nn.Linear, result: dict, names: list[str] | None, *,
                     storage: Storage) -> None:
    """The classifier (`weight`, `bias`, class names, what it was trained on); loads with weights_only=True."""
    from .export import write_file

    buffer = io.BytesIO()
    torch.save({"weight": head.weight.detach().cpu(), "bias": head.bias.detach().cpu(),
                "classes": names or [str(i) for i in range(head.out_features)],
                "arch": str(result.get("arch")), "backbone_sha256": result["backbone_sha256"],
                "top1": result["top1"], "top5": result["top5"]}, buffer)
    write_file(out, buffer.getvalue(), storage=storage)
