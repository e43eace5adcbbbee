"""The paper's linear classification protocol (the reference `main_lincls.py` recipe) on a frozen backbone.

A linear classifier (weights ~ N(0, 0.01), bias 0) on the pooled features of the backbone, which stays frozen
and in eval mode; every epoch streams the labelled training images again with augmentation
(RandomResizedCrop + horizontal flip); SGD, lr 30 per 256 images (scaled linearly with the global batch),
momentum 0.9, no weight decay, lr x0.1 at 60 % and 80 % of the epochs (the reference's 60 and 80 of 100).
Validation: resize + centre crop, top-1 and top-5. Under torchrun each rank streams its own share and the
classifier is trained with DDP (gloo on CPU, NCCL on GPU); the counts of correct answers are summed.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mocostream.moco_core import scaled_lr
from mocostream.moco_core.schedule import step_decay
from mocostream.pipeline.augment_reference import normalize
from mocostream.pipeline.filesystems import Storage
from mocostream.pipeline.labeled_stream import LabeledStream

log = logging.getLogger("mocostream.eval")


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_have(flag: bool, device: torch.device) -> bool:
    """True while every rank still has a batch: ranks that skipped images end an epoch together."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def train_epoch(backbone: nn.Module, head: nn.Module, optimizer, stream: LabeledStream, epoch: int,
                device: torch.device) -> tuple[float, int]:
    """One pass over this rank's share; returns (mean loss, images)."""
    total_loss, images = 0.0, 0
    batches = stream.epoch(epoch)
    try:
        while True:
            batch = next(batches, None)
            if not _all_have(batch is not None, device):
                break
            x, y = normalize(batch[0].to(device)), batch[1].to(device)
            with torch.no_grad():
                feats = backbone(x)
            loss = F.cross_entropy(head(feats), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(y)
            images += len(y)
    finally:
        batches.close()
    return total_loss / max(1, images), images


@torch.no_grad()
def validate(backbone: nn.Module, head: nn.Module, stream: LabeledStream, device: torch.device) -> dict:
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 correct, top-5 correct, images
    for images, labels in stream.epoch(0):
        logits = head(backbone(normalize(images.to(device))))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        labels = labels.to(device)
        counts += torch.tensor([float((top[:, 0] == labels).sum()), float((top == labels[:, None]).any(1).sum()),
                                float(len(labels))], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    n = max(1.0, float(counts[2]))
    return {"top1": float(counts[0]) / n, "top5": float(counts[1]) / n, "test_images": int(counts[2])}


def reference_linear(backbone: nn.Module, feature_dim: int, classes: int, train_units, val_units, size: int,
                     device: torch.device, epochs: int = 100, lr: float = 30.0, batch_size: int = 256,
                     workers: int = 2, seed: int = 0, names: list[str] | None = None, *,
                     storage: Storage) -> tuple[dict, nn.Linear]:
    """Train the linear classifier on the frozen `backbone`; returns (results, classifier). `names`: the
    sorted class names that index string labels (the training set's, for validation too); `storage` reads
    the shards."""
    rank, world = _world()
    torch.manual_seed(seed)  # the same initial classifier on every rank
    head = nn.Linear(feature_dim, classes)
    nn.init.normal_(head.weight, mean=0.0, std=0.01)
    nn.init.zeros_(head.bias)
    head = head.to(device)
    model = nn.parallel.DistributedDataParallel(head) if dist.is_initialized() else head
    peak_lr = scaled_lr(lr, batch_size * world)
    optimizer = torch.optim.SGD(head.parameters(), lr=peak_lr, momentum=0.9, weight_decay=0.0)
    common = dict(batch_size=batch_size, size=size, seed=seed, world=world, rank=rank, workers=workers,
                  classes=names, storage=storage)
    train_stream = LabeledStream(train_units, train=True, **common)
    val_stream = LabeledStream(val_units, train=False, **common)
    backbone.eval()  # frozen: BN uses its running statistics, as in the reference
    milestones = (round(0.6 * epochs), round(0.8 * epochs))
    images = 0
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = peak_lr * step_decay(epoch, milestones)
        loss, n = train_epoch(backbone, model, optimizer, train_stream, epoch, device)
        images += n
        if rank == 0:
            log.info("linear epoch %d/%d | lr %.4g | loss %.4f | %d images", epoch + 1, epochs,
                     optimizer.param_groups[0]["lr"], loss, n)
    result = validate(backbone, head, val_stream, device)
    result.update(train_images=images // max(1, epochs) * world, last_loss=loss,
                  skipped=dict(train_stream.skipped + val_stream.skipped))
    return result, head
