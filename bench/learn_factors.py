"""Where does learning per CPU-minute come from? One factor at a time against learn_cifar.py's CPU recipe.

    taskset -c 1 python bench/learn_factors.py --workdir /tmp/factors --budget-minutes 10
    taskset -c 0 python bench/learn_factors.py --workdir /tmp/factors --budget-minutes 10   # a second lane

Every variant is the base run (learn_cifar.py's CPU moco_v1: `resnet18_cifar_half`, 24-px crops, linear head,
T 0.1, base lr 0.3, batch 128, K 4096, m 0.99, Shuffle BN over 4 sub-batches, the asymmetric loss, v1's
augmentation) with one thing changed, trained for the same wall-clock budget on the same shards, fp32 (the
precision lightly's example runs at, `--peer lightly`'s), and scored by the same `mocostream eval knn` (k 200,
T 0.1, bank = train/, `--knn-max-per-class` per class; 0: all 50,000 / 10,000). A few variants change several
things at once and say so (`lightly_like`: lightly's example's settings on our pipeline).

Each variant's result is kept in W/variants/NAME/result.json; a variant is claimed by making its folder, so two
or more processes on the same --workdir (each pinned with taskset: its runs and their workers inherit the CPUs)
share the list, and a rerun continues. The one that finishes last prints the whole table (`--report` prints
it at any time). One seed per variant: differences below ~1 point are within a run's noise (state it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import learn_cifar  # noqa: E402
from cifar_peer import cpu_model  # noqa: E402

BASE = "moco_v1"
# name -> (what changes, learn_cifar.py flags); each differs from the base in the factor its name says
VARIANTS = {  # in the order they run: the likeliest causes first
    "base": ("learn_cifar.py's CPU moco_v1", []),
    "lightly_like": ("lightly's example's settings as far as ours has them, the small_cpu preset at 32 px: MLP head "
                     "(hidden 256, not 512), base lr 0.12, v2 augmentation (with blur), 8 BN splits, T 0.1 (our 100 "
                     "warmup steps)", ["--recipes", "small_cpu", "--train-size", "32"]),
    "small_cpu": ("the small_cpu preset: lightly_like at 24-px crops", ["--recipes", "small_cpu"]),
    "symmetric": ("symmetric loss (asymmetric)", ["--train-args=--symmetric"]),
    "crop32": ("32-px crops (24)", ["--train-size", "32"]),
    "mlp_head": ("MLP head (linear)", ["--train-args=--mlp"]),
    "lr0.12": ("base lr 0.12: lightly's 0.06 at batch 128 (0.3)", ["--base-lr", "0.12"]),
    "bn8": ("Shuffle BN over 8 sub-batches of 16, lightly's SplitBatchNorm (4 of 32)",
            ["--train-args=--bn-splits 8"]),
    "aug_v2": ("v2's augmentation: colour jitter p 0.8, blur (v1's)",
               ["--recipes", "moco_v2", "--temperature", "0.1", "--base-lr", "0.3",
                "--train-args=--no-mlp --lr-schedule cosine"]),
    "t0.2": ("T 0.2 (0.1)", ["--temperature", "0.2"]),
    "k1024": ("queue 1,024 (4,096)", ["--queue-size", "1024"]),
    "m0.9": ("m 0.9 (0.99)", ["--moco-momentum", "0.9"]),
    "batch64": ("batch 64 (128), lr scaled with it", ["--batch-size", "64"]),
    "lr0.6": ("base lr 0.6 (0.3)", ["--base-lr", "0.6"]),
    "batch256": ("batch 256 (128), lr scaled with it", ["--batch-size", "256"]),
    "k16384": ("queue 16,384 (4,096)", ["--queue-size", "16384"]),
    "m0.999": ("m 0.999 (0.99)", ["--moco-momentum", "0.999"]),
}


def variant_args(name: str, common: list[str]):
    """learn_cifar.py's resolved arguments for one variant (fp32, no curve, the common flags first)."""
    args = learn_cifar.parse_args(["--recipes", BASE, "--precision", "fp32", "--curve-minutes", "0", *common,
                                   *VARIANTS[name][1]])
    learn_cifar.resolve(args)
    return args


def claim(folder: Path) -> bool:
    """True when this process takes the variant: it made the folder, or the process that had made it is gone."""
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        owner = folder / "owner"
        try:
            os.kill(int(owner.read_text()), 0)
            return False
        except (OSError, ValueError):
            pass  # its process died (or had not written its pid yet and never will): take it over
    (folder / "owner").write_text(str(os.getpid()))
    return True


def run_variant(name: str, common: list[str], work: Path, data: Path, shards: Path) -> dict:
    args = variant_args(name, common)
    recipe, folder = args.recipes, work / "variants" / name
    handle = learn_cifar.start_train(args, recipe, args.arch, shards, folder)
    run = learn_cifar.finish_train(args, handle)
    result = learn_cifar.knn(args, data, run["checkpoint_dir"], args.arch)
    out = {"variant": name, "change": VARIANTS[name][0], "flags": VARIANTS[name][1], "recipe": recipe,
           "images": run["step"] * args.batch_size, "steps": run["step"], "train_seconds": run["train_seconds"],
           "steady_images_per_second": run["steady_images_per_second"],
           "seconds_before_steady": run["seconds_before_steady"], "loss": run["loss"], "knn": result,
           "cpus": sorted(os.sched_getaffinity(0)), "load": os.getloadavg()[0]}
    (folder / "result.json").write_text(json.dumps(out, indent=1))
    print(f"{name}: {out['images']:,} images, kNN top-1 {100 * result['top1']:.2f}%", flush=True)
    return out


def report(work: Path, init: dict, budget: float) -> None:
    found = {n: json.loads(p.read_text()) for n in VARIANTS if (p := work / "variants" / n / "result.json").exists()}
    base = found.get("base")
    print(f"\n{cpu_model()}, fp32, one seed, budget {budget:g} min per run; random init kNN top-1 "
          f"{100 * init['top1']:.2f}% ({init['train_images']} bank / {init['test_images']} test images)")
    print("| variant | change (base) | images | steady img/s | before steady | loss | kNN top-1 | vs base |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in found.items():
        rate, before = learn_cifar.speed(r)
        delta = f"{100 * (r['knn']['top1'] - base['knn']['top1']):+.2f}" if base else "–"
        print(f"| {name} | {r['change']} | {r['images']:,} | {rate} | {before} | {r['loss']:.3f} | "
              f"{100 * r['knn']['top1']:.2f}% | {delta} |")
    missing = [n for n in VARIANTS if n not in found]
    if missing:
        print(f"not run yet: {', '.join(missing)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="shared by every lane; keeps data, shards and results")
    p.add_argument("--budget-minutes", type=float, default=10.0)
    p.add_argument("--knn-max-per-class", type=int, default=0)
    p.add_argument("--only", help="comma-separated variants (default: all, in the order above)")
    p.add_argument("--report", action="store_true", help="print the table of the finished variants and exit")
    opts = p.parse_args()
    names = opts.only.split(",") if opts.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants: {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    work = Path(opts.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    common = ["--budget-minutes", str(opts.budget_minutes), "--knn-max-per-class", str(opts.knn_max_per_class),
              "--workdir", str(work)]
    base_args = variant_args("base", common)
    data, shards = learn_cifar.prepare(work)  # a second lane started at once could race it: start one first
    init = learn_cifar.random_init(base_args, data, work, base_args.arch)
    if not opts.report:
        for name in names:
            folder = work / "variants" / name
            if not (folder / "result.json").exists() and claim(folder):
                run_variant(name, common, work, data, shards)
    report(work, init, opts.budget_minutes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
