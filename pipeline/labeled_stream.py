"""Labelled images streamed in batches, for training a classifier on frozen features (the reference linear
protocol) on one device or under torchrun, without holding the set in memory.

The order is the training loader's plan (`plan.rank_blocks`): units shuffled per epoch, cut into equal
contiguous spans per rank, a bounded shuffle within blocks of `shuffle_units` units. A unit is a labelled
shard (tar or parquet, read whole through fsspec: local or s3://) or, for a class-folder tree, a run of up to
256 files (the tree's files are shuffled once first, so each unit mixes classes). Images are decoded and
augmented in worker processes, seeded by their position in the plan, so the result does not depend on timing
or worker count. Unreadable or unlabelled samples are skipped, counted by reason and logged. String labels
(class names, as `shards create` writes them) are indexed by the sorted class names, which must be known before
streaming: the manifest's `classes`, else one counting pass (`shard_class_names`).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import random
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .batching import position_seed
from .labeled import FILE_EXTS, _class_folders, class_index, count_classes, manifest_classes, shard_items
from .filesystems import Storage
from .plan import Block, Piece, rank_blocks
from .sources import DataSpecError, Shard, resolve_shards, with_counts
from .worker_pool import run_ahead

log = logging.getLogger(__name__)

FILES_PER_UNIT = 256
VAL_RESIZE = 256 / 224  # the reference evaluation: resize to 256, centre crop 224


@dataclass(frozen=True)
class Unit:
    count: int
    shard: Shard | None = None  # a labelled shard ...
    files: tuple[tuple[str, int], ...] = ()  # ... or (path, label) of image files

    def read(self, storage: Storage) -> list[tuple[str, int | str | None, bytes | None]]:
        """(name, label, image bytes) of every sample, in stored order (a shard read through `storage`)."""
        if self.shard is not None:
            return list(shard_items(self.shard, storage.read_bytes(self.shard.url)))
        return [(path, label, Path(path).read_bytes()) for path, label in self.files]


def _folder_files(root: Path, part: str | None) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) of a class-folder tree; part `train`/`val` takes the same 4:1 split as `eval` (every 5th
    image of each class is a validation image), None takes all."""
    classes = _class_folders(root)
    files = []
    for label, folder in enumerate(classes):
        names = sorted(f for f in folder.rglob("*") if f.suffix.lower() in FILE_EXTS)
        files += [(str(f), label) for i, f in enumerate(names)
                  if part is None or (i % 5 == 4) == (part == "val")]
    return files, [c.name for c in classes]


def labeled_units(spec: str, part: str | None = None, seed: int = 0, *,
                  storage: Storage) -> tuple[list[Unit], list[str] | None]:
    """Units of a labelled set (class-folder tree or labelled shards, found through `storage`) and its class
    names (for shards: the manifest's `classes`, None when it has none)."""
    path = Path(spec)
    if path.is_dir() and _class_folders(path) and not any(path.glob("*.tar")) and not (path / "manifest.json").exists():
        files, classes = _folder_files(path, part)
        random.Random(f"{seed}-files").shuffle(files)  # units then mix classes, as shuffled shards do
        units = [Unit(len(chunk), files=tuple(chunk))
                 for chunk in (files[i:i + FILES_PER_UNIT] for i in range(0, len(files), FILES_PER_UNIT))]
        return units, classes
    if part is not None:
        raise DataSpecError(f"labelled shards cannot be split into train and val: give a folder with train/ "
                            f"and val/ (or test/) shards: {spec}")
    if not path.exists() and "://" not in spec:
        raise DataSpecError(f"labelled data not found: {spec}")
    shards = storage.retrying(f"read {spec}", lambda: with_counts(resolve_shards(spec, storage=storage),
                                                                  storage=storage))
    return [Unit(s.samples, shard=s) for s in shards], manifest_classes(spec, storage=storage)


def shard_class_names(units: list[Unit], *, storage: Storage) -> list[str] | None:
    """The sorted class names of labelled shards whose manifest does not record them: one pass reading every
    sample's label (None when the labels are class indices)."""
    return count_classes((u.shard for u in units if u.shard is not None), storage=storage)


def split_specs(spec: str) -> tuple[tuple[str, str | None], tuple[str, str | None]]:
    """((train spec, part), (val spec, part)): `train/` and `val/` (or `test/`) under `spec`, else one
    class-folder tree split 4:1."""
    path = Path(spec)
    val = next((path / n for n in ("val", "test") if (path / n).is_dir()), None)
    if (path / "train").is_dir() and val is not None:
        return (str(path / "train"), None), (str(val), None)
    return (spec, "train"), (spec, "val")


def transform_chunk(datas: list[bytes | None], size: int, train: bool, seed: int):
    """Decode + the reference linear protocol's transform (runs in a worker process): train RandomResizedCrop
    + horizontal flip, val resize (256/224 of the crop) + centre crop. Returns uint8 (n, 3, S, S) for the
    decodable images and, per input, None or the reason it was skipped."""
    from torchvision import transforms as T
    from torchvision.transforms import functional as TF

    from .augment_reference import UndecodableImage, decode_rgb

    torch.set_num_threads(1)
    random.seed(seed)
    torch.manual_seed(seed)
    transform = (T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()]) if train
                 else T.Compose([T.Resize(round(size * VAL_RESIZE)), T.CenterCrop(size)]))
    out, reasons = [], []
    for data in datas:
        try:
            if data is None:
                raise UndecodableImage("no_image")
            out.append(TF.pil_to_tensor(transform(decode_rgb(data))).numpy())
            reasons.append(None)
        except UndecodableImage as e:
            reasons.append(e.reason)
        except Exception:  # anything else PIL raises on hostile input
            reasons.append("corrupt")
    return (np.stack(out) if out else np.zeros((0, 3, size, size), np.uint8)), reasons


class LabeledStream:
    def __init__(self, units: list[Unit], *, batch_size: int, size: int, train: bool, seed: int = 0,
                 world: int = 1, rank: int = 0, workers: int = 2, shuffle_units: int = 4,
                 classes: list[str] | None = None, storage: Storage):
        self.index = {name: i for i, name in enumerate(classes or [])}  # class name -> index, for string labels
        self.units, self.batch_size, self.size, self.train = units, batch_size, size, train
        self.seed, self.world, self.rank, self.workers, self.shuffle_units = seed, world, rank, workers, shuffle_units
        self.storage = storage  # reads the units' shards
        self.skipped: Counter = Counter()

    def _blocks(self, epoch: int) -> Iterator[Block]:
        counts = [u.count for u in self.units]
        if self.train:
            return rank_blocks(counts, self.seed, epoch, self.world, self.rank, self.shuffle_units)
        # validation: every sample once, in stored order, units dealt round-robin (no equal split is needed:
        # no collective runs per batch, so ranks may read different numbers of images)
        return (Block((Piece(i, 0, counts[i]),), tuple(range(counts[i])))
                for i in range(self.rank, len(counts), self.world))

    def _samples(self, epoch: int) -> Iterator[tuple[str, int | None, bytes | None]]:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="labeled-read") as pool:
            ahead: deque = deque()
            blocks = self._blocks(epoch)
            for block in blocks:
                ahead.append((block, {p.shard: pool.submit(self.units[p.shard].read, self.storage)
                                      for p in block.pieces}))
                if len(ahead) < 2:  # one block read ahead
                    continue
                yield from self._block_samples(*ahead.popleft())
            while ahead:
                yield from self._block_samples(*ahead.popleft())

    def _block_samples(self, block: Block, futures: dict):
        loaded = {shard: f.result() for shard, f in futures.items()}
        for i in range(block.size):
            shard, index = block.sample_at(i)
            samples = loaded[shard]
            if index >= len(samples):
                self._skip("missing_in_shard", f"{self.units[shard].shard or 'unit'}#{index}")
                continue
            yield samples[index]

    def _skip(self, reason: str, name: str) -> None:
        self.skipped[reason] += 1
        log.warning("labelled image skipped (%s): %s", reason, name)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images (B, 3, S, S), labels (B,)) batches of this rank's share of `epoch`; the last may be short."""
        pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("forkserver")) if self.workers else None
        try:
            yield from self._batches(epoch, pool)
        finally:
            if pool:
                pool.shutdown(wait=False, cancel_futures=True)

    def _batches(self, epoch: int, pool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        jobs = self._jobs(epoch)
        for chunk, (images, reasons) in run_ahead(pool, transform_chunk, jobs, max(1, 2 * self.workers)):
            for (name, _, _), reason in zip(chunk, reasons):
                if reason is not None:
                    self._skip(reason, name)
            labels = [label for (_, label, _), reason in zip(chunk, reasons) if reason is None]
            if labels:
                yield torch.from_numpy(images), torch.tensor(labels, dtype=torch.long)

    def _jobs(self, epoch: int) -> Iterator[tuple[list, tuple]]:
        """(chunk of (name, class index, bytes), transform_chunk's arguments), seeded by the chunk's position."""
        samples, position = self._samples(epoch), 0
        while chunk := self._chunk(samples):
            seed = position_seed(self.seed, self.rank, epoch, position)
            position += len(chunk)
            yield chunk, ([c[2] for c in chunk], self.size, self.train, seed)

    def _chunk(self, samples: Iterator) -> list[tuple[str, int, bytes | None]]:
        """Up to batch_size labelled samples; unlabelled ones or of unknown classes skipped."""
        chunk = []
        for name, label, data in samples:
            if label is None:
                self._skip("no_label", name)
                continue
            if (index := class_index(label, self.index)) is None:
                self._skip("unknown_class", name)
                continue
            chunk.append((name, index, data))
            if len(chunk) == self.batch_size:
                break
        return chunk
