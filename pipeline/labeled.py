"""Labelled evaluation images (for the kNN monitor and `mocostream eval`), decoded once into memory.

A labelled set is either an image folder with one sub-folder per class (class index = sorted folder name),
or shards whose samples carry a label (`.cls` member or `label`/`cls` in the `.json` of a tar sample; a
`label` column in parquet). An integer label is the class index; a string label is a class name (what
`shards create` writes: the class folder's name), indexed like folders by its place among the sorted class
names - the manifest's `classes` when it has them, else the names found in the set. Images are resized (shorter side) and centre-cropped to the encoder's input
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
from torchvision.transforms import functional as TF

from .augment_reference import UndecodableImage, decode_rgb
from .readers import IMAGE_EXTS
from .filesystems import Storage
from .sources import DataSpecError, Shard, resolve_shards

log = logging.getLogger(__name__)

FILE_EXTS = tuple("." + e for e in IMAGE_EXTS)


@dataclass
class LabeledImages:
    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor  # int64 (N,)
    classes: list[str]
    skipped: Counter = field(default_factory=Counter)
    named: bool = False  # labels index `classes` by name (folders, shards with class names)

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


def _label_of(sample: dict) -> int | str | None:
    """The label of a tar sample: an int (a class index), a str (a class name) or None (skipped as no_label)."""
    try:
        if "cls" in sample:
            return _label_value(int(sample["cls"].decode().strip()))
        if "json" in sample:
            meta = json.loads(sample["json"])
            for name in ("label", "cls"):
                if name in meta:
                    return _label_value(meta[name])
    except (ValueError, TypeError):
        return None
    return None


def _label_value(value) -> int | str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0 or isinstance(value, str) and value:
        return value
    return None  # "" (`shards create` without a label), a negative index, null, anything else


def class_index(label: int | str, index: dict[str, int] | None) -> int | None:
    """The class index of a label: an int as it is, a class name by `index` (None: unknown class)."""
    if isinstance(label, int):
        return label
    return index.get(label) if index else None


def manifest_classes(spec: str, *, storage: Storage) -> list[str] | None:
    """The sorted class names a shard set's manifest records (`shards create`), None when it has none."""
    spec = spec.strip()
    if "," in spec or "{" in spec or spec.endswith((".tar", ".parquet")):
        return None
    url = spec if spec.endswith(".json") else spec.rstrip("/") + "/manifest.json"
    try:
        doc = json.loads(storage.read_bytes(url))
    except (OSError, ValueError):
        return None
    classes = doc.get("classes") if isinstance(doc, dict) else None
    return sorted(classes) if isinstance(classes, list) and classes else None


def count_classes(shards, *, storage: Storage) -> list[str] | None:
    """The sorted class names found in every sample of `shards` (one pass over the set); None when none."""
    names = {label for shard in shards for _, label, _ in shard_items(shard, storage.read_bytes(shard.url))
             if isinstance(label, str)}
    return sorted(names) or None


def shard_items(shard: Shard, data: bytes):
    """(name, label or None, image bytes or None) of every sample of one labelled shard, in stored order."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    if shard.format == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data), columns=["key", "image", "label"])
        for key, image, label in zip(*(table.column(c).to_pylist() for c in ("key", "image", "label"))):
            yield f"{shard.url}:{key}", _label_value(label), image
        return
    members = ({**f, "__url__": shard.url} for f in tar_file_iterator(io.BytesIO(data)))
    for sample in group_by_keys(members):
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        yield f"{shard.url}:{sample['__key__']}", _label_of(sample), image


def _shard_items(spec: str, storage: Storage):
    for shard in storage.retrying(f"read {spec}", lambda: resolve_shards(spec, storage=storage)):
        for name, label, image in shard_items(shard, storage.read_bytes(shard.url)):
            yield name, label, (lambda image=image: image)


def _prepare(data: bytes, size: int) -> torch.Tensor:
    img = decode_rgb(data)
    img = TF.center_crop(TF.resize(img, size, interpolation=TF.InterpolationMode.BILINEAR), size)
    return TF.pil_to_tensor(img)


def load_labeled(spec: str, size: int, max_per_class: int | None = None,
                 classes: list[str] | None = None, *, storage: Storage) -> LabeledImages:
    """Decode a labelled set (a class-folder tree, or labelled shards read through `storage`) to uint8 tensors
    of side `size`. `classes`: the class names that index string labels (a validation set takes its training
    set's)."""
    path = Path(spec)
    if path.is_dir() and _class_folders(path) and not any(path.glob("*.tar")) and not (path / "manifest.json").exists():
        names = [c.name for c in _class_folders(path)]
        images, labels, skipped = _decode_items(_folder_items(path, max_per_class), size, max_per_class)
        return _stacked(spec, images, labels, names, skipped, named=True)
    if not (path.exists() or "://" in spec):
        raise DataSpecError(f"labelled eval data not found: {spec}")
    images, labels, skipped = _decode_items(_shard_items(spec, storage), size, max_per_class)
    names = (classes or manifest_classes(spec, storage=storage)
             or sorted({y for y in labels if isinstance(y, str)}))
    index = {name: i for i, name in enumerate(names)}
    keep = [class_index(y, index) is not None for y in labels]
    if not all(keep):
        skipped["unknown_class"] += keep.count(False)
        log.warning("%d eval images of classes outside %d known ones skipped: %s", keep.count(False), len(names), spec)
    images = [x for x, k in zip(images, keep) if k]
    labels = [class_index(y, index) for y, k in zip(labels, keep) if k]
    named = bool(names)
    if not named and labels:  # class indices: the classes present, so a label of 20M costs one class, not 20M
        present = sorted(set(labels))
        names = [str(c) for c in present]
        dense = {c: i for i, c in enumerate(present)}
        labels = [dense[y] for y in labels]
    return _stacked(spec, images, labels, names, skipped, named)


def aligned(*sets: LabeledImages) -> list[LabeledImages]:
    """The sets with one class list (by class name), so the same class has the same index in each."""
    classes = sorted(set().union(*(s.classes for s in sets)), key=lambda c: (0, int(c), "") if c.isdigit() else (1, 0, c))
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for s in sets:
        remap = torch.tensor([index[c] for c in s.classes], dtype=torch.long)
        out.append(LabeledImages(s.images, remap[s.labels] if len(s.labels) else s.labels, classes, s.skipped,
                                 s.named))
    return out


def _decode_items(items, size: int, max_per_class: int | None) -> tuple[list, list, Counter]:
    """Decoded images and their labels (as given) of (name, label, read) items; skips counted by reason."""
    images, labels, skipped, per_class = [], [], Counter(), Counter()
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
        labels.append(label)
        per_class[label] += 1
    return images, labels, skipped


def _stacked(spec: str, images: list, labels: list, classes: list[str], skipped: Counter,
             named: bool) -> LabeledImages:
    if not images:
        raise DataSpecError(f"no labelled images in {spec}")
    return LabeledImages(torch.stack(images), torch.tensor(labels, dtype=torch.long), classes, skipped, named)


def knn_sets(spec: str, size: int, max_per_class: int | None = None, *,
             storage: Storage) -> tuple[LabeledImages, LabeledImages]:
    """(bank, queries) for the kNN monitor: `train/` and `test/` (or `val/`) under `spec` when present,
    else one labelled set split deterministically, every 5th image of each class being a query."""
    path = Path(spec)
    test = next((path / n for n in ("test", "val") if (path / n).is_dir()), None)
    if (path / "train").is_dir() and test is not None:
        bank = load_labeled(str(path / "train"), size, max_per_class, storage=storage)
        # shard queries' class names index as the bank's do (a class only in the queries: skipped, counted);
        # folders, or class indices densified per set, get one class list by name
        queries = load_labeled(str(test), size, max_per_class, bank.classes if bank.named else None,
                               storage=storage)
        return (bank, queries) if queries.classes == bank.classes else tuple(aligned(bank, queries))
    full = load_labeled(spec, size, max_per_class, storage=storage)
    seen: Counter = Counter()
    is_query = []
    for label in full.labels.tolist():
        is_query.append(seen[label] % 5 == 4)
        seen[label] += 1
    q = torch.tensor(is_query)
    return (LabeledImages(full.images[~q], full.labels[~q], full.classes, full.skipped, full.named),
            LabeledImages(full.images[q], full.labels[q], full.classes, named=full.named))
