"""Does the whole system learn? MoCo on CIFAR-10 through the real path, judged by kNN accuracy.

    python bench/learn_cifar.py --budget-minutes 30              # CPU: the small_cpu preset; GPU: v1 and v2
    python bench/learn_cifar.py --budget-minutes 30 --recipes moco_v1,moco_v2   # the papers' recipes
    python bench/learn_cifar.py --budget-minutes 30 --recipes moco_v3   # v3: vit_tiny and the ResNet, one run each
    python bench/learn_cifar.py --budget-minutes 10 --peer lightly --precision fp32   # ours on CPU 0, the peer on 1

On CPU the default is `mocostream train --preset small_cpu` (ops/config.py PRESETS: MoCo v2's algorithm at 24 px,
MLP head, T 0.1, base lr 0.12, 8 BN splits; where its settings come from: bench/learn_factors.py); the recipe
settings below are those of the `moco_v1`/`moco_v2`/`moco_v3` runs when named.

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
(the demo's), 100 warmup steps, cosine lr; the recipe presets set head and augmentation. `--compile` on a GPU
only: on CPU (AMD EPYC, fp32, one core) a cold compile took ~250 CPU-seconds (645 s of a contended core: a whole
10-minute budget) for a step only ~1.05-1.1x faster; with a warm cache (kept in the workdir) its first 20 steps
took ~7 s longer than eager ones and 5 minutes gave 124 steps against eager's 127. T per recipe: v1 0.1 (the
demo's; 0.07 learned alike), v2 0.2 (its own). On CPU v2, with its MLP head, wants half v1's lr: 0.15 (cosine
ending at 1,400 steps, kNN with 500 images per class: lr 0.6 35.5 %, 0.3 41.1 %, 0.15 42.3 %, 0.075 42.6 %;
T 0.1 at lr 0.3 40.0 %). Shards: `--shuffle`.

The peer (`--peer lightly`, bench/cifar_peer.py and bench/peer_lightly_moco.py): lightly 1.6's CIFAR-10 MoCo
example in its own venv, with our backbone's architecture (lightly's ResNet-18 at the same width: same layers,
names after renaming, parameter count and function, checked), fp32, the same budget, batch, data (train/'s
JPEGs through lightly's own dataset and MoCoV2Transform) and DataLoader workers as ours has loader workers. It
runs beside the first recipe's run, each pinned with taskset (`--ours-cpus`, default 0; `--peer-cpus`, default 1),
or with `--peer-after` after it on the same CPUs (default: all of them; each run has them to itself),
and its backbone is scored by the same `mocostream eval knn`, before and after. The summary prints the CPU model,
each run's steady img/s and its time before steady state (what the first log interval took beyond its images'
time at the steady speed: first batch, compilation, warm-up).

Learning curve (`--curve-minutes`, default a tenth of the budget): kNN top-1 on a fixed subset
(`--curve-per-class` images per class of train/ as the bank and of test/ as queries) every mark, for ours (a
checkpoint every `--curve-steps` steps, the first at or after each mark scored after the run, so scoring never
slows training) and the peer (its backbone saved at each mark): learning-curve.json and learning-curve.png in the
workdir, top-1 against images seen and against minutes.

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
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench's own modules, also when loaded by path

from cifar_peer import DEFAULT_VENV, as_checkpoint, backbone_parameters, cpu_model, ensure_lightly, finish_peer, \
    pinned, start_peer
from learn_curve import at_marks, checkpoint_times, curve, write_curves
from mocostream.moco_core.vocabulary import is_vit
from mocostream.ops.config import PRESETS
from mocostream.pipeline.vocabulary import AUTO, BACKEND_CHOICES, RECIPES

REPO = Path(__file__).resolve().parents[1]
TEMPERATURE = {"moco_v1": 0.1, "moco_v2": 0.2, "moco_v3": 0.2}
# v1/v2: on CPU (0.06 on a GPU); v3: per backbone, on any device, with its own weight decay
CPU_BASE_LR = {"moco_v1": 0.3, "moco_v2": 0.15, "moco_v3": {"vit": 5e-4, "resnet": 0.3}}
V3_WEIGHT_DECAY = {"vit": 0.1, "resnet": 1e-5}
DATA = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
PEERS = ("lightly",)
LOG_EVERY = 20  # steps per log line of a run: the intervals its steady speed is read from
PEER_WIDTH = {"resnet18_cifar_half": 0.5, "resnet18_cifar": 1.0}  # our backbone -> the peer's ResNet-18 width


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
    """(temperature, base lr, weight decay) of one run: the flags if given, else the per-recipe defaults above
    (a preset: its own)."""
    if recipe in PRESETS:
        p = PRESETS[recipe]
        return args.temperature or p["temperature"], args.base_lr or p["base_lr"], p["weight_decay"]
    if recipe == "moco_v3":
        kind = "vit" if is_vit(arch) else "resnet"
        return args.temperature or TEMPERATURE[recipe], args.base_lr or CPU_BASE_LR[recipe][kind], V3_WEIGHT_DECAY[kind]
    default_lr = 0.06 if args.device == "cuda" else CPU_BASE_LR[recipe]
    return args.temperature or TEMPERATURE[recipe], args.base_lr or default_lr, args.weight_decay


def train_size(args, arch: str, recipe: str | None = None) -> int:
    if recipe in PRESETS:  # its own size unless --train-size says otherwise
        return args.train_size if args.train_size_given else PRESETS[recipe]["image_size"]
    return 32 if is_vit(arch) else args.train_size  # a ViT's patch grid is fixed: train at the kNN size


def settings_flags(args, recipe: str, arch: str) -> list[str]:
    """The training settings of one run: a preset's own (`--preset`, only the backbone and batch given, as the
    bench's runs all share them), else the bench's per recipe."""
    temperature, base_lr, weight_decay = recipe_settings(args, recipe, arch)
    if recipe in PRESETS:
        return ["--preset", recipe, "--arch", arch, "--batch-size", str(args.batch_size)] + \
            (["--image-size", str(args.train_size)] if args.train_size_given else []) + \
            (["--temperature", str(args.temperature)] if args.temperature else []) + \
            (["--base-lr", str(args.base_lr)] if args.base_lr else [])
    return ["--recipe", recipe, "--arch", arch, "--image-size", str(train_size(args, arch)), "--batch-size",
            str(args.batch_size), "--queue-size", str(args.queue_size), "--moco-momentum", str(args.moco_momentum),
            "--temperature", str(temperature), "--weight-decay", str(weight_decay), "--base-lr", str(base_lr),
            "--warmup-steps", str(args.warmup_steps)]


def train_flags(args, recipe: str, arch: str, shards: Path, ckpt: Path) -> list[str]:
    curve = args.curve_minutes > 0
    flags = ["train", "--data", str(shards), *settings_flags(args, recipe, arch), "--precision", args.precision,
             "--budget-minutes", str(args.budget_minutes), "--checkpoint-dir", str(ckpt),
             # the learning curve's snapshots: a checkpoint every few steps, all kept, scored after the run
             "--checkpoint-every", str(args.curve_steps if curve else 10 ** 9),
             "--keep-checkpoints", str(10 ** 6 if curve else 2),
             "--metrics-port", "0", "--no-progress", "--log-every", str(LOG_EVERY), "--workers", str(args.workers),
             "--device", args.device, "--backend", args.backend, "--seed", "0"]
    if args.compile:
        flags += ["--compile"]
    if recipe == "moco_v1":
        flags += ["--lr-schedule", "cosine"]  # the budget is too short for v1's step milestones to matter
    if recipe == "moco_v3":
        flags += ["--mlp-dim", str(1024 if args.device == "cpu" else 4096)]
    return flags + shlex.split(args.train_args)  # last: they override the above


def start_train(args, recipe: str, arch: str, shards: Path, work: Path) -> dict:
    """`mocostream train` started (pinned to --ours-cpus); its output goes to files, so a peer running beside it
    never waits on a pipe."""
    ckpt = work / f"ckpt-{recipe}-{arch}"
    shutil.rmtree(ckpt, ignore_errors=True)  # an earlier bench's run: never resume it
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    out, err = logs / f"train-{recipe}-{arch}.out", logs / f"train-{recipe}-{arch}.err"
    cmd = pinned([sys.executable, "-m", "mocostream.ops.cli", *train_flags(args, recipe, arch, shards, ckpt)],
                 args.ours_cpus)
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fo, stderr=fe, text=True,
                                env={**os.environ, **compile_env(args, work)})
    return {"proc": proc, "ckpt": ckpt, "out": out, "err": err, "t0": time.monotonic()}


def compile_env(args, work: Path) -> dict:
    """With --compile, torch's compile caches (FX graphs, AOT autograd) in the workdir: a rerun with the same
    --workdir starts from them."""
    return {"TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache")} if args.compile else {}


def finish_train(args, run: dict) -> dict:
    proc = run["proc"]
    try:  # the trainer ends the run itself; this backstop only stops a run that hangs
        proc.wait(timeout=60 * args.budget_minutes + 600)
    except subprocess.TimeoutExpired:  # stop it as a preemption would: it checkpoints and exits
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=600)
    err = run["err"].read_text()
    if proc.returncode != 0:
        sys.exit(f"training failed ({proc.returncode}):\n{err[-3000:]}")
    summary = last_json(run["out"].read_text())
    rates = [float(r) for r in re.findall(r"step \d+ \| ([\d.]+) img/s", err)]
    summary.update(steady_state(rates, LOG_EVERY * args.batch_size))
    summary["wall_seconds"] = time.monotonic() - run["t0"]
    summary["checkpoint_dir"] = str(run["ckpt"])
    return summary


def steady_state(rates: list[float], interval_images: int) -> dict:
    """From the img/s of each log interval: the steady speed, the median interval after the first (single intervals
    swing +-15 %, more on a shared CPU); and the time before steady state, what the first interval took beyond
    its images' time at that speed: first batch, compilation, warm-up (start-up lives in the first steps; the
    rest of the run's ups and downs are the machine's, not start-up's)."""
    if len(rates) < 2:  # too short a run to tell start-up from steady work
        return {"steady_images_per_second": None, "seconds_before_steady": None}
    steady = statistics.median(rates[1:])
    return {"steady_images_per_second": steady,
            "seconds_before_steady": max(0.0, interval_images / rates[0] - interval_images / steady)}


def speed(run: dict) -> tuple[str, str]:
    """(steady img/s, time before steady state) of a run's summary, as text ("n/a" for a run too short to tell)."""
    rate, before = run["steady_images_per_second"], run["seconds_before_steady"]
    return ("n/a" if rate is None else f"{rate:.1f}"), ("n/a" if before is None else f"{before:.0f} s")


def knn(args, data: Path, checkpoint: str | None, arch: str) -> dict:
    what = ["--checkpoint", checkpoint] if checkpoint else ["--arch", arch]
    flags = ["eval", "knn", *what, "--data", str(data), "--image-size", "32", "--device", args.device]
    if args.knn_max_per_class:
        flags += ["--max-per-class", str(args.knn_max_per_class)]
    return last_json(cli(*flags))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-minutes", type=float, default=30.0, help="training wall clock per recipe")
    p.add_argument("--recipes", help="default: small_cpu on CPU, moco_v1,moco_v2 on a GPU; "
                        f"any of {', '.join(RECIPES)}, or a preset of `mocostream train` ({', '.join(PRESETS)}: its "
                        "own settings); moco_v3 (two backbones per run) only when named")
    p.add_argument("--v3-archs", help="backbones of the moco_v3 runs (default: vit_tiny and --arch)")
    p.add_argument("--device", default="auto")
    p.add_argument("--arch", help="default: resnet18_cifar on a GPU, resnet18_cifar_half on CPU")
    p.add_argument("--batch-size", type=int, help="default: 512 on a GPU, 128 on CPU")
    p.add_argument("--train-size", type=int, help="side of the training crops in px (default: 32 on a GPU, 24 on CPU; "
                   "a preset: its own); kNN is always measured on the 32-px images")
    p.add_argument("--queue-size", type=int, default=4096, help="K (the reference CIFAR demo's 4096)")
    p.add_argument("--moco-momentum", type=float, default=0.99, help="m (the CIFAR demo's 0.99)")
    p.add_argument("--temperature", type=float, help="T (default: v1 0.1, the CIFAR demo's; v2 0.2, its own)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="(the CIFAR demo's 5e-4)")
    p.add_argument("--base-lr", type=float,
                   help="lr per 256 images (default: 0.06 on a GPU; on CPU v1 0.3, v2 0.15)")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--precision", help="default: bf16 on a GPU and on CPUs with native bf16 (AMX/AVX512-BF16); "
                                       "fp32 with --peer (the peer's)")
    p.add_argument("--backend", default=AUTO, choices=BACKEND_CHOICES,
                   help="augmentation backend (auto: DALI on a GPU, OpenCV workers on CPU)")
    p.add_argument("--workers", type=int, default=2, help="loader workers: DALI CPU threads or OpenCV processes "
                                                          "(the peer: DataLoader workers)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the encoders (default: on a GPU; not on CPU, where a cold compile takes "
                        "minutes of the budget and the compiled step is only ~1.05-1.1x faster); its caches are "
                        "kept in the workdir")
    p.add_argument("--knn-max-per-class", type=int, default=0,
                   help="cap images per class in bank and test set (0: all 50,000 / 10,000)")
    p.add_argument("--peer", choices=PEERS, help="also run this peer (lightly: its CIFAR-10 MoCo example, "
                   "bench/peer_lightly_moco.py) beside the first run: same backbone, precision, budget and data")
    p.add_argument("--peer-venv", type=Path, default=DEFAULT_VENV, help="the peer's own venv (made on first use)")
    p.add_argument("--ours-cpus", help="taskset CPU list for our runs (default with --peer: 0; else unpinned)")
    p.add_argument("--peer-cpus", help="taskset CPU list for the peer (default: 1; with --peer-after: --ours-cpus)")
    p.add_argument("--peer-after", action="store_true", help="run the peer after our first run instead of beside "
                   "it, on the same CPUs (default: all): the two-core comparison")
    p.add_argument("--curve-minutes", type=float, help="a learning-curve point every this many minutes "
                   "(default: a tenth of the budget; 0: no curve)")
    p.add_argument("--curve-per-class", type=int, default=100, help="images per class in the curve's fixed kNN "
                   "bank (train/) and queries (test/)")
    p.add_argument("--curve-steps", type=int, default=25, help="our checkpoint interval in steps while a curve "
                   "is drawn (the curve takes the first at or after each mark)")
    p.add_argument("--train-args", default="", help="more `mocostream train` flags for every run, e.g. "
                   "'--symmetric --bn-splits 8' (given last: they override the bench's own)")
    p.add_argument("--workdir", help="keeps extracted data and shards between runs (default: a temp dir)")
    return p.parse_args(argv)


def resolve(args) -> None:
    """Device-dependent defaults, and the peer's conditions; a bad combination is a one-line error."""
    import torch

    gpu = torch.cuda.is_available() and args.device in ("auto", "cuda")
    args.device = "cuda" if gpu else "cpu"
    args.arch = args.arch or ("resnet18_cifar" if gpu else "resnet18_cifar_half")
    args.batch_size = args.batch_size or (512 if gpu else 128)
    args.train_size_given = args.train_size is not None  # a preset's own size stands unless this is given
    args.train_size = args.train_size or (32 if gpu else 24)
    args.compile = gpu if args.compile is None else args.compile
    args.recipes = args.recipes or (",".join(r for r in RECIPES if r != "moco_v3") if gpu else "small_cpu")
    if args.peer:
        if gpu:
            sys.exit(f"--peer {args.peer} is a CPU comparison (the peer trains on CPU): give --device cpu")
        if args.precision not in (None, "fp32") or args.arch not in PEER_WIDTH:
            sys.exit(f"--peer {args.peer} trains fp32 with one of {', '.join(PEER_WIDTH)}: "
                     f"give --precision fp32 and one of those --arch")
        args.precision = "fp32"
        if args.peer_after:  # one after the other, on the same CPUs (default: all this process may use)
            args.ours_cpus = args.ours_cpus or ",".join(map(str, sorted(os.sched_getaffinity(0))))
            args.peer_cpus = args.peer_cpus or args.ours_cpus
        else:
            args.ours_cpus, args.peer_cpus = args.ours_cpus or "0", args.peer_cpus or "1"
    args.precision = args.precision or ("bf16" if gpu or torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32")
    if args.curve_minutes is None:
        args.curve_minutes = args.budget_minutes / 10


def prepare(work: Path) -> tuple[Path, Path]:
    """(CIFAR-10 folders, training shards), made once per workdir."""
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
    return data, shards


def main() -> int:
    args = parse_args()
    if not DATA.exists():
        sys.exit(f"needs {DATA}")
    resolve(args)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="learn-cifar-"))
    work.mkdir(parents=True, exist_ok=True)
    peer_python = ensure_lightly(args.peer_venv) if args.peer else None
    data, shards = prepare(work)
    runs = [(recipe, arch) for recipe in args.recipes.split(",")
            for arch in ((args.v3_archs or f"vit_tiny,{args.arch}").split(",") if recipe == "moco_v3" else [args.arch])]
    baselines = {arch: random_init(args, data, work, arch) for arch in dict.fromkeys(arch for _, arch in runs)}
    rows, peer = [], None
    for i, (recipe, arch) in enumerate(runs):
        def launch_peer():
            return start_peer(peer_python, data / "train", work / "peer", args.budget_minutes, args.curve_minutes,
                              args.batch_size, args.workers, PEER_WIDTH[arch], args.peer_cpus)

        with_peer = peer_python is not None and i == 0
        handle = start_train(args, recipe, arch, shards, work)
        peer_run = launch_peer() if with_peer and not args.peer_after else None
        try:
            run = finish_train(args, handle)
        except BaseException:  # ours failed: the peer beside it has nothing to be compared with
            if peer_run:
                peer_run.kill()
            raise
        if with_peer and args.peer_after:  # now, on the CPUs ours had to itself
            peer_run = launch_peer()
        if peer_run:
            peer = finish_peer(peer_run, work / "peer", timeout=60 * args.budget_minutes + 600)
            peer.update(steady_state(peer["rates"], peer["log_every"] * args.batch_size))
        result = knn(args, data, run["checkpoint_dir"], arch)
        rows.append((recipe, arch, run, result, run["step"] * args.batch_size))
        rate, before = speed(run)
        print(f"{recipe} ({arch}): {run['step']} steps, {rows[-1][4]} images in {run['train_seconds'] / 60:.1f} min "
              f"({run['wall_seconds'] / 60:.1f} min with start-up and checkpoints), {run['images_per_second']:.1f} "
              f"img/s (steady {rate}, {before} before it), loss {run['loss']:.3f}; kNN top-1 "
              f"{100 * result['top1']:.2f}%", flush=True)
    peer_rows = score_peer(args, data, work, peer) if peer else []
    report(args, baselines, rows, peer_rows)
    if args.curve_minutes > 0:
        curves(args, data, work, rows, peer)
    return 0


def score_peer(args, data: Path, work: Path, peer: dict) -> list[tuple]:
    """The peer's backbone before and after, as ours: `mocostream eval knn` on the same data."""
    ours = backbone_parameters(args.arch)
    if peer["backbone_parameters"] != ours:
        sys.exit(f"the peer's backbone has {peer['backbone_parameters']:,} parameters, {args.arch} {ours:,}")
    first, last = (Path(peer["snapshots"][i]["path"]) for i in (0, -1))
    before = knn(args, data, str(as_checkpoint(first, work / "peer" / "eval-first.pt", args.arch)), args.arch)
    after = knn(args, data, str(as_checkpoint(last, work / "peer" / "eval-last.pt", args.arch)), args.arch)
    rate, start_up = speed(peer)
    print(f"{peer['peer']} MoCo example ({args.arch}, {ours:,} backbone parameters as ours): {peer['step']} steps, "
          f"{peer['images']} images in {peer['train_seconds'] / 60:.1f} min, {peer['images_per_second']:.1f} img/s "
          f"(steady {rate}, {start_up} before it), loss {peer['loss']:.3f}; kNN top-1 {100 * before['top1']:.2f}% -> "
          f"{100 * after['top1']:.2f}%", flush=True)
    return [(peer, before, after)]


def report(args, baselines: dict, rows: list, peer_rows: list) -> None:
    pins = f"; ours on CPUs {args.ours_cpus}" if args.ours_cpus else ""
    pins += f", {args.peer} on CPUs {args.peer_cpus}" if args.peer else ""
    print(f"\n{cpu_model()} ({os.cpu_count()} CPUs{pins}); {args.train_size}-px crops (ViTs, presets: their own), "
          f"batch {args.batch_size}, K {args.queue_size}, m {args.moco_momentum}, warmup {args.warmup_steps}, "
          f"{args.precision}{', compiled' if args.compile else ''}, {args.device}, budget {args.budget_minutes:g} min "
          f"per run, load {os.getloadavg()[0]:.1f}")
    print("| encoder | T | lr | images seen | steady img/s | before steady | kNN top-1 | vs its init |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for arch, base in baselines.items():
        print(f"| random init ({arch}) | – | – | 0 | – | – | {100 * base['top1']:.2f}% | – |")
    for recipe, arch, run, result, images in rows:
        temperature, base_lr, _ = recipe_settings(args, recipe, arch)
        rate, before = speed(run)
        print(f"| {recipe} ({arch}, {train_size(args, arch, recipe)} px) | {temperature:g} | {base_lr:g} per 256 | "
              f"{images:,} ({images / 50000:.1f} epochs) | {rate} | {before} | {100 * result['top1']:.2f}% | "
              f"{100 * (result['top1'] - baselines[arch]['top1']):+.2f} pts |")
    for peer, before, after in peer_rows:
        rate, start_up = speed(peer)
        print(f"| {peer['peer']} MoCo example ({args.arch} equivalent) | 0.1 | 0.06 | {peer['images']:,} "
              f"({peer['images'] / 50000:.1f} epochs) | {rate} | {start_up} | {100 * after['top1']:.2f}% | "
              f"{100 * (after['top1'] - before['top1']):+.2f} pts (init {100 * before['top1']:.2f}%) |")


def curves(args, data: Path, work: Path, rows: list, peer: dict | None) -> None:
    """kNN top-1 on the fixed subset at each curve mark, for each run: JSON and PNG in the workdir."""
    found = {}
    for recipe, arch, run, _, _ in rows:
        saved = checkpoint_times(Path(run["checkpoint_dir"]))
        marks = at_marks(saved, 60 * args.curve_minutes)
        for unused in {c["path"] for c in saved} - {c["path"] for c in marks}:
            Path(unused).unlink()  # ~36 MB each; the curve's and the final one stay
        found[f"ours: {recipe} ({arch})"] = curve(data, [{"step": 0, "train_seconds": 0.0}, *marks], arch,
                                                  args.batch_size, args.curve_per_class)
    if peer:
        snapshots = [{**s, "path": str(as_checkpoint(Path(s["path"]), Path(s["path"]).with_suffix(".ckpt.pt"),
                                                     args.arch))} for s in peer["snapshots"]]
        found[f"{peer['peer']} MoCo example ({args.arch})"] = curve(data, snapshots, args.arch, args.batch_size,
                                                                   args.curve_per_class)
    subset = f"{10 * args.curve_per_class} bank / {10 * args.curve_per_class} queries"
    meta = {"cpu": cpu_model(), "budget_minutes": args.budget_minutes, "curve_minutes": args.curve_minutes,
            "subset": subset, "precision": args.precision, "ours_cpus": args.ours_cpus,
            "peer_cpus": args.peer_cpus if peer else None,
            "title": f"CIFAR-10, {args.budget_minutes:g}-min budget, {cpu_model()}, kNN on {subset}"}
    write_curves(found, meta, work / "learning-curve.json", work / "learning-curve.png")
    print(f"learning curve: {work / 'learning-curve.json'} and {work / 'learning-curve.png'}")


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
