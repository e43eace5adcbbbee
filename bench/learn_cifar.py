"""Does the whole system learn? MoCo on CIFAR-10 through the real path, judged by kNN accuracy.

    python bench/learn_cifar.py --budget-minutes 30              # v1 and v2, on whatever device there is
    python bench/learn_cifar.py --budget-minutes 30 --recipes moco_v3   # v3: vit_tiny and the ResNet, one run each

Steps: extract `../shared/data/cifar10-jpg.tar.gz`; `mocostream shards create` on `train/` (tar shards);
kNN top-1 on `test/` of the randomly initialised encoder (the starting point of training: same seed);
then for each recipe `mocostream train --budget-minutes` on the shards, and kNN top-1 of the final checkpoint
(`mocostream eval knn`: backbone features, k 200, T 0.1, bank = `train/`).

The trainer keeps the budget itself: its training loop (first batch, compilation and data waits included) ends
when the budget is spent, and the cosine lr follows the clock, not a step count, so the schedule ends with the
budget however fast the machine runs that day (on these shared CPUs it swings 1.5-2x between runs).
CPU defaults (2 cores): `resnet18_cifar_half` (the CIFAR stem at half width: a quarter of ResNet-18's compute)
on 24-px crops, batch 128, base lr 0.3, bf16 autocast where the CPU has native bf16 (AMX: ~2x fp32). The ImageNet
stem is cheaper still but leaves a 32-px image at 1x1 and learned far less per CPU-minute. 24-px crops cost ~0.6x
the compute of 32-px ones and learned as much per step (kNN after 600 steps: 38.0 vs 38.1 %; 16 px: 32.9 %).
RandomResizedCrop enlarges objects, so a net trained on smaller crops sees test images at 32 px at about the
object size it trained on (the FixRes effect); kNN is always measured on the 32-px images. On a GPU:
`resnet18_cifar`, batch 512, base lr 0.06, as the reference CIFAR demo. Both: K 4096, m 0.99, weight decay 5e-4
(the demo's), 100 warmup steps, cosine lr, `--compile` (the step 1.3x faster on CPU); the recipe presets set head
and augmentation. T per recipe: v1 0.1 (the demo's; 0.07 learned alike), v2 0.2 (its own). On CPU v2, with its MLP
head, wants half v1's lr: 0.15 (cosine ending at 1,400 steps, kNN with 500 images per class: lr 0.6 35.5 %, 0.3
41.1 %, 0.15 42.3 %, 0.075 42.6 %; T 0.1 at lr 0.3 40.0 %). Shards: `--shuffle`.

moco_v3 runs once per backbone of `--v3-archs` (default: `vit_tiny` and the ResNet above), with its recipe's
optimizer, momentum schedule (m 0.99 rising to 1 with the clock) and asymmetric augmentation, and the settings the
CIFAR literature uses at these batch sizes rather than the ImageNet ones: T 0.2 for both (solo-learn's CIFAR
MoCo v3), LARS base lr 0.3 and weight decay 1e-5 for the ResNet (solo-learn), AdamW base lr 5e-4 and weight
decay 0.1 for the ViT (1.5e-4 per 256 images is ImageNet's at batch 4096; at batch 128 it would barely move in
a CPU budget), MLP width 1024 on CPU (4096 on a GPU). `vit_tiny` trains on 32-px crops: its fixed patch grid is
the kNN images' size.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from mocostream.moco_core.vocabulary import is_vit
from mocostream.pipeline.vocabulary import AUTO, BACKEND_CHOICES, RECIPES

REPO = Path(__file__).resolve().parents[1]
TEMPERATURE = {"moco_v1": 0.1, "moco_v2": 0.2, "moco_v3": 0.2}
# v1/v2: on CPU (0.06 on a GPU); v3: per backbone, on any device, with its own weight decay
CPU_BASE_LR = {"moco_v1": 0.3, "moco_v2": 0.15, "moco_v3": {"vit": 5e-4, "resnet": 0.3}}
V3_WEIGHT_DECAY = {"vit": 0.1, "resnet": 1e-5}
DATA = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def cli(*args: str, timeout: float | None = None, env: dict | None = None) -> str:
    r = subprocess.run([sys.executable, "-m", "mocostream.ops.cli", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        sys.exit(f"mocostream {' '.join(args[:2])} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def extract(dest: Path) -> Path:
    root = dest / "cifar10"
    if not (root / "test").is_dir():
        with tarfile.open(DATA) as tf:
            tf.extractall(dest / "cifar10-tmp", filter="data")
        inner = next(p.parent for p in (dest / "cifar10-tmp").rglob("train") if p.is_dir())
        inner.rename(root)
    return root


def recipe_settings(args, recipe: str, arch: str) -> tuple[float, float, float]:
    """(temperature, base lr, weight decay) of one run: the flags if given, else the per-recipe defaults above."""
    if recipe == "moco_v3":
        kind = "vit" if is_vit(arch) else "resnet"
        return args.temperature or TEMPERATURE[recipe], args.base_lr or CPU_BASE_LR[recipe][kind], V3_WEIGHT_DECAY[kind]
    default_lr = 0.06 if args.device == "cuda" else CPU_BASE_LR[recipe]
    return args.temperature or TEMPERATURE[recipe], args.base_lr or default_lr, args.weight_decay


def train_size(args, arch: str) -> int:
    return 32 if is_vit(arch) else args.train_size  # a ViT's patch grid is fixed: train at the kNN size


def train_run(args, recipe: str, arch: str, shards: Path, work: Path) -> dict:
    ckpt = work / f"ckpt-{recipe}-{arch}"
    temperature, base_lr, weight_decay = recipe_settings(args, recipe, arch)
    shutil.rmtree(ckpt, ignore_errors=True)  # an earlier bench's run: never resume it
    flags = ["train", "--data", str(shards), "--recipe", recipe, "--arch", arch, "--image-size",
             str(train_size(args, arch)), "--batch-size", str(args.batch_size), "--queue-size", str(args.queue_size),
             "--moco-momentum", str(args.moco_momentum), "--temperature", str(temperature),
             "--weight-decay", str(weight_decay), "--base-lr", str(base_lr),
             "--warmup-steps", str(args.warmup_steps), "--precision", args.precision,
             "--budget-minutes", str(args.budget_minutes), "--checkpoint-dir", str(ckpt),
             "--checkpoint-every", str(10 ** 9),
             "--metrics-port", "0", "--no-progress", "--log-every", "20", "--workers", str(args.workers),
             "--device", args.device, "--backend", args.backend, "--seed", "0"]
    if args.compile:
        flags += ["--compile"]
    if recipe == "moco_v1":
        flags += ["--lr-schedule", "cosine"]  # the budget is too short for v1's step milestones to matter
    if recipe == "moco_v3":
        flags += ["--mlp-dim", str(1024 if args.device == "cpu" else 4096)]
    proc = subprocess.Popen([sys.executable, "-m", "mocostream.ops.cli", *flags], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    try:  # the trainer ends the run itself; this backstop only stops a run that hangs
        out, err = proc.communicate(timeout=60 * args.budget_minutes + 600)
    except subprocess.TimeoutExpired:  # stop it as a preemption would: it checkpoints and exits
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        sys.exit(f"training failed ({proc.returncode}):\n{err[-3000:]}")
    summary = last_json(out)
    # steady state: the median --log-every interval after the first (start-up); single intervals swing +-15 %
    rates = sorted(float(r) for r in re.findall(r"step \d+ \| ([\d.]+) img/s", err)[1:])
    summary["steady_images_per_second"] = rates[len(rates) // 2] if rates else summary["images_per_second"]
    summary["wall_seconds"] = time.monotonic() - t0
    summary["checkpoint_dir"] = str(ckpt)
    return summary


def knn(args, data: Path, checkpoint: str | None, arch: str) -> dict:
    what = ["--checkpoint", checkpoint] if checkpoint else ["--arch", arch]
    flags = ["eval", "knn", *what, "--data", str(data), "--image-size", "32", "--device", args.device]
    if args.knn_max_per_class:
        flags += ["--max-per-class", str(args.knn_max_per_class)]
    return last_json(cli(*flags))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-minutes", type=float, default=30.0, help="training wall clock per recipe")
    p.add_argument("--recipes", default=",".join(r for r in RECIPES if r != "moco_v3"),
                   help=f"any of {', '.join(RECIPES)}; moco_v3 (two backbones per run) only when named")
    p.add_argument("--v3-archs", help="backbones of the moco_v3 runs (default: vit_tiny and --arch)")
    p.add_argument("--device", default="auto")
    p.add_argument("--arch", help="default: resnet18_cifar on a GPU, resnet18_cifar_half on CPU")
    p.add_argument("--batch-size", type=int, help="default: 512 on a GPU, 128 on CPU")
    p.add_argument("--train-size", type=int, help="side of the training crops in px (default: 32 on a GPU, 24 on CPU); "
                   "kNN is always measured on the 32-px images")
    p.add_argument("--queue-size", type=int, default=4096, help="K (the reference CIFAR demo's 4096)")
    p.add_argument("--moco-momentum", type=float, default=0.99, help="m (the CIFAR demo's 0.99)")
    p.add_argument("--temperature", type=float, help="T (default: v1 0.1, the CIFAR demo's; v2 0.2, its own)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="(the CIFAR demo's 5e-4)")
    p.add_argument("--base-lr", type=float,
                   help="lr per 256 images (default: 0.06 on a GPU; on CPU v1 0.3, v2 0.15)")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--precision", help="default: bf16 on a GPU and on CPUs with native bf16 (AMX/AVX512-BF16)")
    p.add_argument("--backend", default=AUTO, choices=BACKEND_CHOICES,
                   help="augmentation backend (auto: DALI on a GPU, OpenCV workers on CPU)")
    p.add_argument("--workers", type=int, default=2, help="loader workers: DALI CPU threads or OpenCV processes")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the encoders (CPU: 1.3x the step speed; its ~15-70 s are part of the budget)")
    p.add_argument("--knn-max-per-class", type=int, default=0,
                   help="cap images per class in bank and test set (0: all 50,000 / 10,000)")
    p.add_argument("--workdir", help="keeps extracted data and shards between runs (default: a temp dir)")
    args = p.parse_args()
    if not DATA.exists():
        sys.exit(f"needs {DATA}")
    import torch

    gpu = torch.cuda.is_available() and args.device in ("auto", "cuda")
    args.device = "cuda" if gpu else "cpu"
    args.arch = args.arch or ("resnet18_cifar" if gpu else "resnet18_cifar_half")
    args.batch_size = args.batch_size or (512 if gpu else 128)
    args.train_size = args.train_size or (32 if gpu else 24)
    args.precision = args.precision or ("bf16" if gpu or torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="learn-cifar-"))
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.monotonic()
    data = extract(work)
    shards = work / "shards"
    manifest = shards / "manifest.json"
    if manifest.exists() and not json.loads(manifest.read_text())["options"]["shuffle"]:
        shutil.rmtree(shards)  # an older workdir's class-sorted shards
    if not manifest.exists():
        # --shuffle: train/ is listed class by class, and shards that each hold one or two classes make every
        # batch (and the queue) nearly single-class; the stream's bounded shuffle cannot undo that.
        cli("shards", "create", str(data / "train"), "--out", str(shards), "--format", "tar",
            "--samples-per-shard", "2000", "--shuffle", "--seed", "0", "--reencode", "never", "--dedup", "none",
            "--quiet", "--workers", str(os.cpu_count() or 1))
    print(f"data ready in {time.monotonic() - t0:.0f} s: {work}", flush=True)

    runs = [(recipe, arch) for recipe in args.recipes.split(",")
            for arch in ((args.v3_archs or f"vit_tiny,{args.arch}").split(",") if recipe == "moco_v3" else [args.arch])]
    baselines = {arch: random_init(args, data, work, arch) for arch in dict.fromkeys(arch for _, arch in runs)}
    rows = []
    for recipe, arch in runs:
        run = train_run(args, recipe, arch, shards, work)
        result = knn(args, data, run["checkpoint_dir"], arch)
        images = run["step"] * args.batch_size
        rows.append((recipe, arch, run, result, images))
        print(f"{recipe} ({arch}): {run['step']} steps, {images} images ({images / 50000:.1f} epochs) in "
              f"{run['train_seconds'] / 60:.1f} min ({run['wall_seconds'] / 60:.1f} min with start-up and checkpoint), "
              f"{run['images_per_second']:.1f} img/s (steady {run['steady_images_per_second']:.1f}), "
              f"loss {run['loss']:.3f}; "
              f"kNN top-1 {100 * result['top1']:.2f}%", flush=True)

    print(f"\n{args.train_size}-px crops (ViTs 32 px), batch {args.batch_size}, K {args.queue_size}, "
          f"m {args.moco_momentum}, warmup {args.warmup_steps}, {args.precision}"
          f"{', compiled' if args.compile else ''}, {args.device}, "
          f"budget {args.budget_minutes:g} min per run")
    print("| encoder | T | base lr | images seen | training time | kNN top-1 | vs random init |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for arch, base in baselines.items():
        print(f"| random init ({arch}) | – | – | 0 | – | {100 * base['top1']:.2f}% | – |")
    for recipe, arch, run, result, images in rows:
        temperature, base_lr, _ = recipe_settings(args, recipe, arch)
        print(f"| {recipe} ({arch}) | {temperature:g} | {base_lr:g} | {images:,} ({images / 50000:.1f} epochs) | "
              f"{run['train_seconds'] / 60:.1f} min | "
              f"{100 * result['top1']:.2f}% | {100 * (result['top1'] - baselines[arch]['top1']):+.2f} pts |")
    return 0


def random_init(args, data: Path, work: Path, arch: str) -> dict:
    """kNN top-1 of the randomly initialised encoder (the runs' starting weights: same seed), cached per arch."""
    cached = work / f"knn-random-init-{arch}-{args.knn_max_per_class}.json"
    result = json.loads(cached.read_text()) if cached.exists() else knn(args, data, None, arch)
    cached.write_text(json.dumps(result))
    print(f"random init ({arch}): kNN top-1 {100 * result['top1']:.2f}% "
          f"({result['train_images']} bank / {result['test_images']} test images)", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
