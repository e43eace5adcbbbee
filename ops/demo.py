"""`mocostream demo`: the whole pipeline on an embedded default, needing nothing from the user.

No installed dependency ships a set of real photos, so the demo draws its own: 256 JPEGs in 8 classes
of textured scenes (stripes, rings, blobs, checkers in random colours, with noise), written as class
folders, turned into tar shards by the shard tool, then trained on with two-view augmentation (`--backend
auto`: DALI on a GPU, OpenCV workers on CPU) while a Prometheus endpoint serves the metrics.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mocostream.shards.create import create_shards

from .config import build_config
from .ports import free_port, port_is_free

CLASSES = ("stripes_h", "stripes_v", "stripes_diag", "rings", "checker", "blobs", "gradient", "dots")


def _pattern(kind: str, rng: random.Random, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    freq = rng.uniform(3, 9)
    phase = rng.uniform(0, 2 * math.pi)
    if kind == "stripes_h":
        field = np.sin(2 * math.pi * freq * y + phase)
    elif kind == "stripes_v":
        field = np.sin(2 * math.pi * freq * x + phase)
    elif kind == "stripes_diag":
        field = np.sin(2 * math.pi * freq * (x + y) / 1.4 + phase)
    elif kind == "rings":
        cx, cy = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
        field = np.sin(2 * math.pi * freq * np.hypot(x - cx, y - cy) + phase)
    elif kind == "checker":
        field = np.sign(np.sin(2 * math.pi * freq * x + phase) * np.sin(2 * math.pi * freq * y))
    elif kind == "blobs":
        field = np.zeros_like(x)
        for _ in range(6):
            cx, cy, r = rng.random(), rng.random(), rng.uniform(0.05, 0.2)
            field += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        field = field / field.max() * 2 - 1
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        field = np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)
        field = field / np.abs(field).max()
    else:  # dots
        field = np.sign(np.sin(2 * math.pi * freq * x) + np.sin(2 * math.pi * freq * y) - 1.2)
    a, b = np.array([rng.randrange(256) for _ in range(3)]), np.array([rng.randrange(256) for _ in range(3)])
    t = (field[..., None] + 1) / 2
    image = a * t + b * (1 - t) + np.random.default_rng(rng.randrange(2**32)).normal(0, 12, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_images(folder: Path, per_class: int = 32, size: int = 96, seed: int = 0) -> int:
    rng = random.Random(seed)
    for kind in CLASSES:
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_pattern(kind, rng, size)).save(folder / kind / f"{i:04d}.jpg", quality=90)
    return per_class * len(CLASSES)


def demo(workdir: str, steps: int = 40, backend: str = "auto", metrics_port: int = 9400) -> dict:
    from .train import train

    t0 = time.perf_counter()
    root = Path(workdir).resolve()
    images, shards_dir, ckpt_dir = root / "images", root / "shards", root / "checkpoints"
    if not (images / CLASSES[-1]).exists():
        n = write_images(images)
        print(f"[demo] drew {n} images in {len(CLASSES)} classes: {images}")
    if not (shards_dir / "manifest.json").exists():
        report = create_shards([str(images)], str(shards_dir), fmt="tar", samples_per_shard=64, progress=False)
        print(f"[demo] {report.written} samples in {len(report.shards)} tar shards: {shards_dir}/manifest.json")
    else:
        print(f"[demo] reusing the shards of an earlier run: {shards_dir}/manifest.json")
    cfg = build_config({}, dict(
        data=str(shards_dir), steps=steps, batch_size=32, arch="resnet18", image_size=64, backend=backend,
        recipe="moco_v2", queue_size=512, moco_momentum=0.99, base_lr=0.06, checkpoint_dir=str(ckpt_dir), checkpoint_every=max(1, steps // 2),
        metrics_port=metrics_port, metrics_addr="127.0.0.1", log_every=5, trace_keys=str(root / "trace-keys")))
    if ckpt_dir.exists():  # a rerun of the demo is a new run: train never writes into another run's folder
        shutil.rmtree(ckpt_dir)
    if metrics_port == 0 or not port_is_free(metrics_port):  # taken (or 0): any free port will do for a demo
        cfg.metrics_port = free_port()
    summary = train(cfg)
    seconds = time.perf_counter() - t0
    print(f"[demo] {summary['step']} MoCo steps, loss {summary['loss']:.3f}, "
          f"instance accuracy {summary['instance_accuracy']:.2f}, {seconds:.0f} s in all")
    print(f"[demo] checkpoint: {summary['checkpoint']}")
    print(f"[demo] metrics were served at http://127.0.0.1:{summary['metrics_port']}/metrics")
    print(f"[demo] keys consumed: {root / 'trace-keys'}.rank0")
    (root / "summary.json").write_text(json.dumps({**summary, "seconds": seconds}, indent=2))
    return summary
