"""Evaluation of a pretrained encoder on a labelled set: weighted kNN, and a linear probe.

Both use the query encoder's backbone (projection head removed), frozen and in eval mode. Features are
computed once (no augmentation, so they cannot change), then the kNN vote or the linear classifier runs
on them. A fingerprint of the backbone's weights and buffers taken before and after proves it did not change.
"""
from __future__ import annotations

import hashlib
import logging
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_core import backbone_of, build_encoder, extract_features, knn_top1
from pipeline.augment_torch import normalize
from pipeline.labeled import LabeledImages, knn_sets

from . import checkpoint

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


def load_query_encoder(path: str | None, arch: str | None = None) -> tuple[nn.Module, dict]:
    """The query encoder of a training checkpoint (file, or the latest in a folder / s3 prefix), or a
    randomly initialised `arch` when `path` is None (the baseline every result is compared with)."""
    if path is None:
        if not arch:
            raise EvalError("give --checkpoint, or --arch for a randomly initialised encoder")
        torch.manual_seed(0)
        return build_encoder(arch)(num_classes=128), {"arch": arch, "step": 0}
    file = path if path.endswith(".pt") else checkpoint.latest(path)
    if file is None:
        raise EvalError(f"no checkpoint in {path}")
    directory = file.rsplit("/", 1)[0] if "/" in file else "."
    try:
        state = checkpoint.load(file, directory)
    except FileNotFoundError:
        raise EvalError(f"checkpoint not found: {file}") from None
    cfg = state.get("config", {})
    encoder = build_encoder(cfg.get("arch", arch or "resnet50"))(num_classes=cfg.get("dim", 128))
    if cfg.get("mlp"):
        dim_mlp = encoder.fc.weight.shape[1]
        encoder.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), encoder.fc)
    prefix = "encoder_q."
    weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    encoder.load_state_dict(weights)
    return encoder, {"arch": cfg.get("arch"), "step": int(state.get("step", 0)), "checkpoint": file}


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


def evaluate(kind: str, data: str, checkpoint_path: str | None = None, arch: str | None = None,
             image_size: int | None = None, device: str = "cpu", k: int = 200, t: float = 0.1,
             max_per_class: int | None = None, epochs: int = 100, lr: float = 0.1) -> dict:
    """`kind` is knn or linear. Returns the accuracy and what it was measured on."""
    t0 = time.perf_counter()
    dev = torch.device(device)
    encoder, info = load_query_encoder(checkpoint_path, arch)
    size = image_size or (32 if str(info.get("arch", "")).endswith("_cifar") else 224)
    bank, queries = knn_sets(data, size, max_per_class)
    backbone = backbone_of(encoder).to(dev)
    for p in backbone.parameters():
        p.requires_grad_(False)
    before = fingerprint(backbone)
    if kind == "knn":
        top1 = knn_eval(backbone, bank, queries, dev, k, t)
    elif kind == "linear":
        train_x, test_x = features(backbone, bank, dev), features(backbone, queries, dev)
        top1 = linear_probe(train_x, bank.labels, test_x, queries.labels, len(bank.classes), epochs, lr)
    else:
        raise EvalError(f"unknown evaluation {kind!r}; choose knn or linear")
    after = fingerprint(backbone)
    if after != before:  # the evaluation must never move the representation it measures
        raise RuntimeError("the backbone changed during evaluation")
    return {"eval": kind, "top1": top1, **info, "image_size": size, "train_images": len(bank),
            "test_images": len(queries), "classes": len(bank.classes), "backbone_sha256": after,
            "backbone_unchanged": True, "seconds": round(time.perf_counter() - t0, 2),
            "skipped": dict(bank.skipped + queries.skipped)}
