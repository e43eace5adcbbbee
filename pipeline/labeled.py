"""Labelled evaluation images (for the kNN monitor and `mocostream eval`), decoded once into memory.

A labelled set is either an image folder with one sub-folder per class (class index = sorted folder name),
or shards whose samples carry a label (`.cls` member or `label`/`cls` in the `.json` of a tar sample; a
`label` column in parquet). Images are resized (shorter side) and centre-cropped to the encoder's input
size, as the reference evaluation does, and kept as uint8; unreadable images are skipped, counted and logged.
"""
from __future__ import annotations

import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import functional as TF

from .augment_torch import UndecodableImage, decode_rgb
from .readers import IMAGE_EXTS
from .sources import DataSpecError, Shard, read_bytes, resolve_shards

log = logging.getLogger(__name__)

FILE_EXTS = tuple("." + e for e in IMAGE_EXTS)


@dataclass
class LabeledImages:
    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor  # int64 (N,)
    classes: list[str]
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.labels)


def _class_folders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_items(root: Path, max_per_class: int | None):
    classes = _class_folders(root)
    for index, folder in enumerate(classes):
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in FILE_EXTS)
        for f in files[:max_per_class]:
            yield str(f), index, f.read_bytes


def _as_label(raw) -> int | None:
    """A class index (an integer >= 0, or its text), else None: skipped and counted as no_label, never fatal."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, str) and raw.strip().isdigit():
        return int(raw.strip())
    return raw if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0 else None


def _label_of(sample: dict) -> int | None:
    """The class index of a tar sample; None (skipped as no_label) when it has none or it is not a non-negative
    integer (a class name, as `shards create` writes the folder name, is no index)."""
    if "cls" in sample:
        return _as_label(sample["cls"])
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            return None
        for name in ("label", "cls"):
            if isinstance(meta, dict) and name in meta:
                return _as_label(meta[name])
    return None


def shard_items(shard: Shard, data: bytes):
    """(name, label or None, image bytes or None) of every sample of one labelled shard, in stored order."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    if shard.format == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data), columns=["key", "image", "label"])
        for key, image, label in zip(*(table.column(c).to_pylist() for c in ("key", "image", "label"))):
            yield f"{shard.url}:{key}", None if label is None else _as_label(label), image
        return
    members = ({**f, "__url__": shard.url} for f in tar_file_iterator(io.BytesIO(data)))
    for sample in group_by_keys(members):
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        yield f"{shard.url}:{sample['__key__']}", _label_of(sample), image


def _shard_items(spec: str):
    for shard in resolve_shards(spec):
        for name, label, image in shard_items(shard, read_bytes(shard.url)):
            yield name, label, (lambda image=image: image)


def _prepare(data: bytes, size: int) -> torch.Tensor:
    img = decode_rgb(data)
    img = TF.center_crop(TF.resize(img, size, interpolation=TF.InterpolationMode.BILINEAR), size)
    return TF.pil_to_tensor(img)


def load_labeled(spec: str, size: int, max_per_class: int | None = None) -> LabeledImages:
    """Decode a labelled set (a class-folder tree, or labelled shards) to uint8 tensors of side `size`."""
    path = Path(spec)
    images, labels, skipped = [], [], Counter()
    if path.is_dir() and _class_folders(path) and not any(path.glob("*.tar")) and not (path / "manifest.json").exists():
        classes = [c.name for c in _class_folders(path)]
        items = _folder_items(path, max_per_class)
    elif path.exists() or "://" in spec:
        classes, items = None, _shard_items(spec)
    else:
        raise DataSpecError(f"labelled eval data not found: {spec}")
    per_class: Counter = Counter()
    for name, label, read in items:
        if label is None:
            skipped["no_label"] += 1
            log.warning("eval sample skipped (no_label): %s", name)
            continue
        if max_per_class is not None and per_class[label] >= max_per_class:
            continue
        try:
            images.append(_prepare(read(), size))
        except UndecodableImage as e:
            skipped[e.reason] += 1
            log.warning("eval image skipped (%s): %s", e.reason, name)
            continue
        labels.append(int(label))
        per_class[label] += 1
    if not images:
        raise DataSpecError(f"no labelled images in {spec}")
    if classes is None:  # shard labels: the classes present, so a label of 20M costs one class, not 20M
        classes = [str(c) for c in sorted(set(labels))]
        index = {int(c): i for i, c in enumerate(classes)}
        labels = [index[label] for label in labels]
    return LabeledImages(torch.stack(images), torch.tensor(labels, dtype=torch.long), classes, skipped)


def _class_order(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def aligned(*sets: LabeledImages) -> list[LabeledImages]:
    """The sets with one class list (by class name), so the same class has the same index in each."""
    classes = sorted(set().union(*(s.classes for s in sets)), key=_class_order)
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for s in sets:
        remap = torch.tensor([index[c] for c in s.classes], dtype=torch.long)
        out.append(LabeledImages(s.images, remap[s.labels] if len(s.labels) else s.labels, classes, s.skipped))
    return out


def knn_sets(spec: str, size: int, max_per_class: int | None = None) -> tuple[LabeledImages, LabeledImages]:
    """(bank, queries) for the kNN monitor: `train/` and `test/` (or `val/`) under `spec` when present,
    else one labelled set split deterministically, every 5th image of each class being a query."""
    path = Path(spec)
    test = next((path / n for n in ("test", "val") if (path / n).is_dir()), None)
    if (path / "train").is_dir() and test is not None:
        bank, queries = aligned(load_labeled(str(path / "train"), size, max_per_class),
                                load_labeled(str(test), size, max_per_class))
        return bank, queries
    full = load_labeled(spec, size, max_per_class)
    seen: Counter = Counter()
    is_query = []
    for label in full.labels.tolist():
        is_query.append(seen[label] % 5 == 4)
        seen[label] += 1
    q = torch.tensor(is_query)
    return (LabeledImages(full.images[~q], full.labels[~q], full.classes, full.skipped),
            LabeledImages(full.images[q], full.labels[q], full.classes))
