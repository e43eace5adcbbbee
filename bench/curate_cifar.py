"""Does curation help? `mocostream curate` on an uncurated CIFAR-10 collection, scored with the truth and by
what MoCo learns from it at the same training budget.

    python bench/curate_cifar.py --workdir /tmp/curate-cifar --budget-minutes 30 --seeds 0,1

Steps (each prints its figures; everything lives in --workdir, and a rerun continues where it stopped):
1. `../shared/tools/make_uncurated.py` on `../shared/data/cifar10-jpg.tar.gz` (its defaults: a long tail of
   100x, reposts 25 %, junk 15 %) into W/unc (images/*.jpg + truth.jsonl), then `mocostream shards create
   --shuffle --dedup none --reencode never` into W/raw.
2. The embedder: `mocostream train --data W/raw` for the budget with learn_cifar.py's CPU settings (moco_v2,
   `resnet18_cifar_half`, 24-px crops, batch 128; a GPU gets its GPU settings). It is also the raw arm's run
   with the first seed: the same command would be run again otherwise.
3. `mocostream curate W/raw --embed-with <its checkpoint> --out W/cur --keep-fraction 0.5`.
4. The arms, each `train` for the same budget with every seed of --seeds, and kNN top-1 of the final checkpoint
   (`mocostream eval knn`, k 200, T 0.1, the balanced CIFAR-10 test set, bank = CIFAR-10 train): raw (W/raw);
   curated (W/cur); random (W/rand: a uniform random subset of W/raw of the curated selection's size, written as
   a selection manifest with the curate tool's own writer, so it reads W/raw's shards as the curated arm does);
   perceptual (W/perc: `shards create --dedup perceptual`, the shard tool's own dedup, a second shard set).
5. Each selection scored with the truth (the tool never sees it): copies kept per viral image, junk share,
   class max/min ratio, the 3 rarest classes' originals kept, originals lost; the issue's targets with PASS or
   FAIL; everything in W/results.json.

Samples are joined to the truth through the shards themselves: every sample's JSON names its `source` file,
which is the truth's `file` (keys are the file names' stems, but the join does not rely on that).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learn_cifar import DATA, REPO, cli, extract, knn, last_json, recipe_settings, train_size  # noqa: E402

from mocostream.pipeline.vocabulary import AUTO, BACKEND_CHOICES, RECIPES  # noqa: E402

MAKE_UNCURATED = REPO.parent / "shared" / "tools" / "make_uncurated.py"
ARMS = ("raw", "curated", "random", "perceptual")
# Trained only when named in --arms: the originals exactly, picked with the truth (a bound, not a curation).
BOUNDS = ("originals",)
RARE_CLASSES = 3


# ---------------------------------------------------------------- scoring (pure)

def _ratio(counts: Counter, labels: list) -> float:
    low = min(counts[c] for c in labels)
    return max(counts[c] for c in labels) / low if low else math.inf


def score_selection(truth: list[dict], kept: set[str], universe: set[str] | None = None) -> dict:
    """What a selection kept, by the truth of make_uncurated.py. `truth`: its records (`file`, `kind`, `label`,
    `group`); `kept`: the files selected; `universe`: the files the selection chose from (default: all).
    An original counts as kept when it or one of its reposts is (its content is in the set: a dedup may keep a
    repost of a viral image rather than the original); a viral group is an original with at least one repost."""
    records = [r for r in truth if universe is None or r["file"] in universe]
    kept = {r["file"] for r in records if r["file"] in kept}
    groups, viral = defaultdict(list), set()
    for r in records:
        if r["kind"] != "junk":
            groups[r["group"]].append(r["file"])
            if r["kind"] == "repost":
                viral.add(r["group"])
    content = {g for g, files in groups.items() if any(f in kept for f in files)}
    images = [r for r in records if r["kind"] != "junk"]
    labels = sorted({r["label"] for r in images})
    before, after = Counter(r["label"] for r in images), Counter(r["label"] for r in images if r["file"] in kept)
    originals = [r for r in records if r["kind"] == "original"]
    per_class = Counter(r["label"] for r in originals)
    rarest = sorted(per_class, key=lambda c: (per_class[c], c))[:RARE_CLASSES]
    rare_kept = {c: sum(r["group"] in content for r in originals if r["label"] == c) for c in rarest}
    junk_before = sum(r["kind"] == "junk" for r in records) / max(1, len(records))
    junk_after = sum(r["kind"] == "junk" for r in records if r["file"] in kept) / max(1, len(kept))
    return {
        "images": len(records), "kept": len(kept), "kept_share": len(kept) / max(1, len(records)),
        "viral_groups": len(viral),
        "copies_per_viral_before": sum(len(groups[g]) for g in viral) / max(1, len(viral)),
        "copies_per_viral": sum(sum(f in kept for f in groups[g]) for g in viral) / max(1, len(viral)),
        "junk_share_before": junk_before, "junk_share_after": junk_after,
        "junk_cut": junk_before / junk_after if junk_after else math.inf,
        "class_ratio_before": _ratio(before, labels), "class_ratio_after": _ratio(after, labels),
        "rarest_classes": rarest,
        "rarest_originals": {c: per_class[c] for c in rarest},
        "rarest_kept_share": sum(rare_kept.values()) / max(1, sum(per_class[c] for c in rarest)),
        "rarest_kept_share_by_class": {c: rare_kept[c] / per_class[c] for c in rarest},
        "originals_lost_share": sum(r["group"] not in content for r in originals) / max(1, len(originals)),
        "best_class_ratio": best_class_ratio(per_class, len(kept)),
    }


def best_class_ratio(originals_per_class: Counter, size: int) -> float:
    """The lowest class max/min ratio any selection of `size` images can have, knowing the labels: one image per
    original (no copies, no junk), every class up to a common cap, the cap as low as `size` allows (a class
    smaller than the cap keeps all it has). A bound for the class-ratio target, not a target itself."""
    counts = sorted(originals_per_class.values())
    if not counts or size <= 0:
        return math.inf
    left = size
    for i, n in enumerate(counts):  # water-filling: classes smaller than an even share of what is left keep all
        share = left / (len(counts) - i)
        if n >= share:  # this class and every larger one are cut to the share
            return share / counts[0] if i else 1.0
        left -= n
    return counts[-1] / counts[0]  # size holds every original: the originals' own ratio


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def judge(scores: dict[str, dict], top1: dict[str, list[float]]) -> list[dict]:
    """The issue's targets for the curated arm: [{target, value, goal, passed}] (passed None: not measured).
    `scores`: arm -> score_selection(); `top1`: arm -> kNN top-1 (fraction) of each seed's run."""
    c = scores["curated"]
    rows = [
        ("copies kept per viral image", c["copies_per_viral"], "<= 2", c["copies_per_viral"] <= 2),
        ("junk share cut (before / after)", c["junk_cut"], ">= 3x", c["junk_cut"] >= 3),
        ("class max/min ratio, kept", c["class_ratio_after"], f"<= raw / 3 = {c['class_ratio_before'] / 3:.1f} (the "
         f"best any selection of this size can do: {c['best_class_ratio']:.1f})",
         c["class_ratio_after"] <= c["class_ratio_before"] / 3),
        (f"{RARE_CLASSES} rarest classes: originals kept", c["rarest_kept_share"], ">= 0.80",
         c["rarest_kept_share"] >= 0.8),
    ]
    mine = _mean(top1.get("curated", []))
    for arm, goal, margin in (("raw", ">= +3 pts", 3.0), ("random", "> 0 pts", 0.0), ("perceptual", "> 0 pts", 0.0)):
        other = _mean(top1.get(arm, []))
        gap = None if mine is None or other is None else 100 * (mine - other)
        passed = None if gap is None else (gap >= margin if margin else gap > 0)
        rows.append((f"kNN top-1: curated - {arm}", gap, goal, passed))
    return [{"target": t, "value": v, "goal": g, "passed": p} for t, v, g, p in rows]


# ---------------------------------------------------------------- the data

def shard_sources(folder: Path) -> dict[str, str]:
    """key -> source file name of every sample in a tar shard set (from the samples' JSON)."""
    out = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(m).read())
                    out[meta["key"]] = Path(meta["source"]).name
    return out


def make_collection(args, work: Path) -> list[dict]:
    """Steps 1 and the perceptual arm's shard set; returns the truth."""
    unc = work / "unc"
    if not (unc / "truth.jsonl").exists():  # written last
        extra = ["--per-class-max", str(args.per_class_max)] if args.per_class_max else []
        subprocess.run([sys.executable, str(MAKE_UNCURATED), "--source", str(DATA), "--out", str(unc), *extra],
                       check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((unc / "summary.json").read_text())
    print(f"collection: {summary['images']} images: {summary['originals']} originals, {summary['reposts']} reposts "
          f"of {summary['viral_originals']} viral originals (largest group {summary['largest_repost_group']}), "
          f"{summary['junk']} junk", flush=True)
    for name, dedup in (("raw", "none"), ("perc", "perceptual")):
        if not (work / name / "manifest.json").exists():  # shards create continues an interrupted run itself
            report = last_json(cli("shards", "create", str(unc / "images"), "--out", str(work / name), "--shuffle",
                                   "--seed", "0", "--dedup", dedup, "--reencode", "never", "--samples-per-shard",
                                   str(args.samples_per_shard), "--quiet", "--json"))
            print(f"shards create --dedup {dedup}: {report['written']} written, rejected {report['rejected_by_reason']}",
                  flush=True)
    return [json.loads(line) for line in (unc / "truth.jsonl").read_text().splitlines()]


def random_selection(cur: Path, out: Path, seed: int) -> int:
    """A uniform random subset of the curated data, as large as the curated selection (see subset_selection)."""
    import numpy as np

    def pick(keys: list[str], kept: int) -> np.ndarray:
        return np.random.default_rng(seed).choice(len(keys), size=kept, replace=False)

    return subset_selection(cur, out, pick)


def originals_selection(cur: Path, out: Path, sources: dict[str, str], truth: list[dict]) -> int:
    """Exactly the collection's originals, chosen with the truth: not a curation (the tool never sees the
    truth) but a bound on what removing reposts and junk alone could give at this budget."""
    import numpy as np

    original = {r["file"] for r in truth if r["kind"] == "original"}
    return subset_selection(cur, out, lambda keys, kept: np.flatnonzero([sources[k] in original for k in keys]))


def subset_selection(cur: Path, out: Path, pick) -> int:
    """A subset of the curated data as a selection manifest in `out` (written by the curate tool's writer:
    `train --data out` reads the data's shards as they are), and the chosen keys in out/keys.json; `pick(keys,
    kept)` gives the chosen rows of the curated selection's (`kept`: how many the curation kept). Returns the
    samples chosen."""
    import numpy as np
    import pyarrow.parquet as pq

    from mocostream.curate.kept import refs, write_kept, write_manifest
    from mocostream.curate.layout import Dest, shard_urls
    from mocostream.curate.tables import read_index
    from mocostream.pipeline.filesystems import Storage

    storage = Storage()
    index, meta = read_index(Dest(str(cur), storage))
    urls = shard_urls(index.column("name").combine_chunks(), meta.get("data_base", "")).to_pylist()
    shard_of = dict(zip(urls, index.column("shard").to_pylist()))
    sel = pq.read_table(cur / "selection.parquet", columns=["key", "shard", "member", "kept"])
    every = refs([shard_of[u] for u in sel.column("shard").to_pylist()], sel.column("member").to_numpy())
    kept = int(sel.column("kept").to_numpy(zero_copy_only=False).sum())
    chosen = np.sort(pick(sel.column("key").to_pylist(), kept))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "keys.json").write_text(json.dumps(sel.column("key").take(chosen).to_pylist()))
    np.save(out / "kept-0.npy", np.sort(every[chosen]), allow_pickle=False)
    dest = Dest(str(out), storage)
    fingerprint, n = write_kept(dest, [str(out / "kept-0.npy")], dict(zip(index.column("shard").to_pylist(),
                                                                          index.column("name").to_pylist())), meta)
    (out / "kept-0.npy").unlink()
    write_manifest(dest, meta, fingerprint, len(every), n)
    return n


def selected_files(work: Path, sources: dict[str, str]) -> dict[str, set[str]]:
    """arm -> the truth files it trains on."""
    import pyarrow.parquet as pq

    sel = pq.read_table(work / "cur" / "selection.parquet", columns=["key", "kept"]).to_pydict()
    curated = {sources[k] for k, keep in zip(sel["key"], sel["kept"]) if keep}
    rand = json.loads((work / "rand" / "keys.json").read_text())
    out = {"raw": set(sources.values()), "curated": curated, "random": {sources[k] for k in rand},
           "perceptual": set(shard_sources(work / "perc").values())}
    if (work / "orig" / "keys.json").exists():
        out["originals"] = {sources[k] for k in json.loads((work / "orig" / "keys.json").read_text())}
    return out


# ---------------------------------------------------------------- training and kNN

def train(args, data: Path, run: Path, seed: int) -> dict:
    """One MoCo run on `data` for the budget (learn_cifar.py's settings), then kNN top-1 of its checkpoint;
    cached in run/result.json (a rerun skips finished runs and restarts an interrupted one)."""
    done = run / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(run, ignore_errors=True)
    temperature, base_lr, weight_decay = recipe_settings(args, args.recipe, args.arch)
    flags = ["train", "--data", str(data), "--recipe", args.recipe, "--arch", args.arch, "--image-size",
             str(train_size(args, args.arch)), "--batch-size", str(args.batch_size), "--queue-size",
             str(args.queue_size), "--moco-momentum", str(args.moco_momentum), "--temperature", str(temperature),
             "--weight-decay", str(weight_decay), "--base-lr", str(base_lr), "--warmup-steps",
             str(min(args.warmup_steps, args.steps) if args.steps else args.warmup_steps),
             "--precision", args.precision, "--budget-minutes", str(args.budget_minutes), "--checkpoint-dir",
             str(run / "ckpt"), "--checkpoint-every", str(10 ** 9), "--metrics-port", "0", "--no-progress",
             "--log-every", "20", "--workers", str(args.workers), "--device", args.device, "--backend", args.backend,
             "--seed", str(seed)]
    flags += ["--compile"] if args.compile else []
    flags += ["--steps", str(args.steps)] if args.steps else []
    flags += ["--lr-schedule", "cosine"] if args.recipe == "moco_v1" else []
    flags += ["--mlp-dim", str(1024 if args.device == "cpu" else 4096)] if args.recipe == "moco_v3" else []
    t0 = time.monotonic()
    summary = last_json(cli(*flags, timeout=60 * args.budget_minutes + 900))
    result = {"data": str(data), "seed": seed, "steps": summary["step"], "images": summary["step"] * args.batch_size,
              "train_seconds": summary["train_seconds"], "images_per_second": summary["images_per_second"],
              "loss": summary["loss"], "wall_seconds": time.monotonic() - t0, "checkpoint": str(run / "ckpt")}
    result["knn"] = knn(args, args.cifar, result["checkpoint"], args.arch)
    done.write_text(json.dumps(result, indent=1))
    return result


def report_run(arm: str, r: dict) -> None:
    print(f"{arm} seed {r['seed']}: {r['steps']} steps ({r['images']} images) in {r['train_seconds'] / 60:.1f} min, "
          f"{r['images_per_second']:.1f} img/s, loss {r['loss']:.3f}; kNN top-1 {100 * r['knn']['top1']:.2f}%",
          flush=True)


def curate(args, work: Path, embedder: str) -> dict:
    if not (work / "cur" / "manifest.json").exists():  # written last; a rerun of the command continues
        t0 = time.monotonic()
        eps = ["--dedup-eps", str(args.dedup_eps)] if args.dedup_eps is not None else []
        cli("curate", str(work / "raw"), "--embed-with", embedder, "--out", str(work / "cur"), "--keep-fraction",
            str(args.keep_fraction), "--device", args.device, *eps)
        print(f"curate: {time.monotonic() - t0:.0f} s", flush=True)
    report = json.loads((work / "cur" / "report.json").read_text())
    print(f"curate: {report['inputs']} in, {report['kept']} kept, dropped {report['dropped']}, levels "
          f"{report['levels']}", flush=True)
    return report


# ---------------------------------------------------------------- the report

def _fmt(v, digits=2) -> str:
    return "–" if v is None else "inf" if v == math.inf else f"{v:.{digits}f}"


def print_tables(scores: dict, runs: dict, targets: list[dict], arms=ARMS) -> None:
    print("\n| arm | images | copies per viral image | junk share | junk cut | class max/min | "
          f"{RARE_CLASSES} rarest: originals kept | originals lost | kNN top-1 per seed | mean |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    raw = scores["raw"]
    print(f"| uncurated collection | {raw['images']} | {_fmt(raw['copies_per_viral_before'], 1)} | "
          f"{100 * raw['junk_share_before']:.1f}% | – | {_fmt(raw['class_ratio_before'], 1)} | 100% | 0% | – | – |")
    for arm in arms:
        s, top = scores[arm], [100 * r["knn"]["top1"] for r in runs.get(arm, [])]
        name = f"{arm} (picked with the truth: a bound)" if arm in BOUNDS else arm
        print(f"| {name} | {s['kept']} | {_fmt(s['copies_per_viral'], 1)} | {100 * s['junk_share_after']:.1f}% | "
              f"{_fmt(s['junk_cut'], 1)}x | {_fmt(s['class_ratio_after'], 1)} | {100 * s['rarest_kept_share']:.0f}% | "
              f"{100 * s['originals_lost_share']:.1f}% | {', '.join(f'{t:.2f}' for t in top) or '–'} | "
              f"{_fmt(_mean(top))} |")
    print("\n| target (curated arm) | value | goal | result |\n| --- | ---: | --- | --- |")
    for t in targets:
        verdict = "–" if t["passed"] is None else "PASS" if t["passed"] else "FAIL"
        print(f"| {t['target']} | {_fmt(t['value'])} | {t['goal']} | {verdict} |")


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="keeps every step's results; a rerun continues (default: a temp dir)")
    p.add_argument("--budget-minutes", type=float, default=30.0, help="training wall clock of every run")
    p.add_argument("--steps", type=int, default=0, help="also cap every run at this many steps (0: no cap)")
    p.add_argument("--seeds", default="0,1", help="training seeds of every arm (the first also trains the embedder)")
    p.add_argument("--arms", default=",".join(ARMS), help="the arms this invocation trains (the others' finished "
                   "runs in the workdir are still reported): e.g. raw,perceptual while a curation is being redone")
    p.add_argument("--keep-fraction", type=float, default=0.5)
    p.add_argument("--dedup-eps", type=float, help="curate's (default: the tool's)")
    p.add_argument("--per-class-max", type=int, default=0, help="make_uncurated.py's (0: its default, 5000)")
    p.add_argument("--samples-per-shard", type=int, default=2000)
    p.add_argument("--random-seed", type=int, default=0, help="seed of the random subset")
    p.add_argument("--recipe", default="moco_v2", choices=RECIPES)
    p.add_argument("--device", default="auto")
    p.add_argument("--arch", help="default: resnet18_cifar on a GPU, resnet18_cifar_half on CPU")
    p.add_argument("--batch-size", type=int, help="default: 512 on a GPU, 128 on CPU")
    p.add_argument("--train-size", type=int, help="training crops in px (default: 32 on a GPU, 24 on CPU)")
    p.add_argument("--queue-size", type=int, default=4096)
    p.add_argument("--moco-momentum", type=float, default=0.99)
    p.add_argument("--temperature", type=float, help="default: learn_cifar.py's per recipe")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--base-lr", type=float, help="default: learn_cifar.py's per recipe and device")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--precision", help="default: bf16 on a GPU and on CPUs with native bf16, else fp32")
    p.add_argument("--backend", default=AUTO, choices=BACKEND_CHOICES)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile every run (default: on a GPU only; on CPU a cold compile takes minutes "
                        "of the budget for a ~1.05-1.1x step, learn_cifar.py's reading)")
    p.add_argument("--knn-max-per-class", type=int, default=0, help="cap bank and test images per class (0: all)")
    args = p.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available() and args.device in ("auto", "cuda")
    args.device = "cuda" if gpu else "cpu"
    args.arch = args.arch or ("resnet18_cifar" if gpu else "resnet18_cifar_half")
    args.batch_size = args.batch_size or (512 if gpu else 128)
    args.train_size = args.train_size or (32 if gpu else 24)
    args.compile = gpu if args.compile is None else args.compile
    args.precision = args.precision or ("bf16" if gpu or torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32")
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not args.seed_list:
        p.error("--seeds: at least one seed")
    args.arm_list = [a for a in args.arms.split(",") if a.strip()]
    if not args.arm_list or set(args.arm_list) - set(ARMS + BOUNDS):
        p.error(f"--arms: some of {', '.join(ARMS + BOUNDS)}")
    return args


def check_workdir(args, work: Path) -> None:
    """A rerun continues only with the settings the workdir was made with (more seeds may be added)."""
    fixed = {k: v for k, v in vars(args).items() if k not in ("workdir", "seeds", "seed_list", "arms", "arm_list")}
    saved = work / "settings.json"
    if saved.exists() and json.loads(saved.read_text()) != fixed:
        old = json.loads(saved.read_text())
        changed = sorted(k for k in fixed.keys() | old.keys() if fixed.get(k) != old.get(k))
        sys.exit(f"{work} was made with other settings ({', '.join(changed)}): use another --workdir")
    saved.write_text(json.dumps(fixed, indent=1))


def main(argv=None) -> int:
    args = parse_args(argv)
    if not DATA.exists() or not MAKE_UNCURATED.exists():
        sys.exit(f"needs {DATA} and {MAKE_UNCURATED}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="curate-cifar-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    check_workdir(args, work)
    print(f"workdir {work}; {cpu_model()}; {args.device}, {args.precision}", flush=True)
    truth = make_collection(args, work)
    args.cifar = extract(work)
    data = {"raw": work / "raw", "curated": work / "cur", "random": work / "rand", "perceptual": work / "perc",
            "originals": work / "orig"}
    runs = defaultdict(list)
    runs["raw"].append(train(args, data["raw"], work / "runs" / f"raw-s{args.seed_list[0]}", args.seed_list[0]))
    report_run("embedder = raw", runs["raw"][0])
    cur_report = curate(args, work, runs["raw"][0]["checkpoint"])
    if not (work / "rand" / "manifest.json").exists():
        print(f"random subset: {random_selection(work / 'cur', work / 'rand', args.random_seed)} samples", flush=True)
    sources = shard_sources(work / "raw")
    if "originals" in args.arm_list and not (work / "orig" / "manifest.json").exists():
        print(f"originals (truth): {originals_selection(work / 'cur', work / 'orig', sources, truth)} samples",
              flush=True)
    kept = selected_files(work, sources)
    arms = [a for a in ARMS + BOUNDS if a in kept]
    scores = {arm: score_selection(truth, kept[arm], kept["raw"]) for arm in arms}
    for arm in arms:
        s = scores[arm]
        print(f"{arm}: {s['kept']} kept, {s['copies_per_viral']:.1f} copies per viral image, junk "
              f"{100 * s['junk_share_after']:.1f}%, class max/min {_fmt(s['class_ratio_after'], 1)}", flush=True)
    for seed in args.seed_list:
        for arm in arms:
            if arm == "raw" and seed == args.seed_list[0]:
                continue
            run = work / "runs" / f"{arm}-s{seed}"
            if arm in args.arm_list or (run / "result.json").exists():
                runs[arm].append(train(args, data[arm], run, seed))
                report_run(arm, runs[arm][-1])
    targets = judge(scores, {arm: [r["knn"]["top1"] for r in rs] for arm, rs in runs.items()})
    print_tables(scores, runs, targets, arms)
    settings = {k: v for k, v in vars(args).items() if k != "cifar"}
    (work / "results.json").write_text(json.dumps({
        "settings": settings, "cpu": cpu_model(), "curate_report": {k: cur_report[k] for k in (
            "inputs", "kept", "dropped", "levels", "keep_fraction", "dedup_eps", "target_size")},
        "scores": scores, "runs": runs, "targets": targets}, indent=1, default=str))
    print(f"\n{work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
