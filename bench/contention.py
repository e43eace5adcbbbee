"""Training and `shards create` throughput on a shared machine: alone, beside busy processes, and on one CPU.

    python bench/contention.py                              # every scenario, 2 rounds, 60 steps per run
    python bench/contention.py --steps 40 --rounds 1 --scenarios alone,busy1

Two settings, alternating within each round (so slow drifts of the machine's load hit both alike):
  before    the sizing before the CPU budget: 2 loader threads, torch's intra-op threads = the CPUs in the
            affinity mask (what torch picks by itself), libgomp's own spin-then-sleep wait (GOMP_SPINCOUNT at
            its default 300000 keeps mocostream from choosing its short spin), no thread tuner;
            `shards create --workers <affinity CPUs> --io-concurrency 64`
  budgeted  today's defaults: everything sized from the CPU budget, passive OpenMP wait, the thread tuner.
Scenarios: alone; busy1 / busy2: beside 1 / 2 busy-loop processes; taskset1: pinned to one CPU;
quota1: in a cgroup with a CPU quota of 1 (skipped where no cgroup can be made).
Training: `train --recipe moco_v1 --arch resnet18_cifar_half --image-size 24 --batch-size 128 --precision bf16
--backend dali` on CIFAR-10 shards (a class-balanced subset of train/, made once in --workdir); steady img/s is
the median of the --log-every intervals after the first. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learn_cifar import extract  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CGROUP_V1, CGROUP_V2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")
BUSY = [sys.executable, "-c", "while True: pass"]


def subset(train: Path, dest: Path, per_class: int) -> Path:
    """`per_class` images of each class, hard-linked (train/ holds 5,000 per class)."""
    if not dest.is_dir():
        for folder in sorted(p for p in train.iterdir() if p.is_dir()):
            (dest / folder.name).mkdir(parents=True)
            for f in sorted(folder.iterdir())[:per_class]:
                os.link(f, dest / folder.name / f.name)
    return dest


class OneCpuQuota:
    """A cgroup with a CPU quota of one CPU (v1 cpu controller or v2 cpu.max), or None when none can be made."""

    @staticmethod
    def make() -> Path | None:
        for base, files in ((CGROUP_V1, {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "100000"}),
                            (CGROUP_V2, {"cpu.max": "100000 100000"})):
            folder = base / f"mocostream-bench-{uuid.uuid4().hex[:8]}"
            try:
                folder.mkdir()
                for name, value in files.items():
                    (folder / name).write_text(value)
                return folder
            except OSError:
                if folder.is_dir():
                    folder.rmdir()
        return None


def wrap(argv: list[str], scenario: str, cgroup: Path | None) -> list[str]:
    if scenario == "taskset1":
        return ["taskset", "-c", "0", *argv]
    if scenario == "quota1":  # join the cgroup, then become the command
        return ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *argv]
    return argv


def cpus_for(scenario: str) -> int:
    return 1 if scenario == "taskset1" else len(os.sched_getaffinity(0))


def train_argv(args, setting: str, scenario: str, ckpt: Path) -> tuple[list[str], dict]:
    argv = [sys.executable, "-m", "mocostream.ops.cli", "train", "--data", str(args.shards), "--recipe", "moco_v1",
            "--arch", "resnet18_cifar_half", "--image-size", "24", "--batch-size", "128", "--precision", "bf16",
            "--steps", str(args.steps), "--log-every", str(args.log_every), "--metrics-port", "0",
            "--no-progress", "--checkpoint-dir", str(ckpt), "--checkpoint-every", str(10 ** 9),
            "--backend", "dali"]  # the loader these figures were measured with: only the sizing differs
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    if setting == "before":
        argv += ["--workers", "2", "--intra-op-threads", str(cpus_for(scenario)), "--no-adapt-threads"]
        env["GOMP_SPINCOUNT"] = "300000"
    return argv, env


def train_rate(args, setting: str, scenario: str, cgroup: Path | None) -> tuple[float, int]:
    ckpt = args.workdir / f"ckpt-{uuid.uuid4().hex[:8]}"
    argv, env = train_argv(args, setting, scenario, ckpt)
    try:
        r = subprocess.run(wrap(argv, scenario, cgroup), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=args.timeout)
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
    if r.returncode != 0:
        sys.exit(f"train failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rates = [float(x) for x in re.findall(r"step \d+/\d+ \| ([\d.]+) img/s", r.stderr)[1:]]
    summary = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])
    switches = re.findall(r"intra-op threads (\d+ -> \d+): steps", r.stderr)  # the thread tuner's decisions
    if switches:
        print(f"    thread tuner: {', '.join(switches)}", flush=True)
    return (statistics.median(rates) if rates else summary["images_per_second"]), summary["intra_op_threads"]


def shards_rate(args, setting: str, scenario: str, cgroup: Path | None) -> tuple[float, int]:
    out = args.workdir / f"shards-{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, "-m", "mocostream.ops.cli", "shards", "create", str(args.images), "--out", str(out),
            "--format", "tar", "--samples-per-shard", "1000", "--reencode", "never", "--dedup", "none", "--json"]
    if setting == "before":
        argv += ["--workers", str(cpus_for(scenario)), "--io-concurrency", "64"]
    try:
        r = subprocess.run(wrap(argv, scenario, cgroup), cwd=REPO, capture_output=True, text=True,
                           timeout=args.timeout)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if r.returncode != 0:
        sys.exit(f"shards create failed ({r.returncode}):\n{r.stderr[-3000:]}")
    report = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])
    return report["images_per_second"], 0


def run_scenario(args, job: str, scenario: str, setting: str, cgroup: Path | None) -> tuple[float, int]:
    busy = [subprocess.Popen(BUSY) for _ in range({"busy1": 1, "busy2": 2}.get(scenario, 0))]
    try:
        return (train_rate if job == "train" else shards_rate)(args, setting, scenario, cgroup)
    finally:
        for p in busy:
            p.kill()
            p.wait()


def table(results: dict, scenarios: list[str], jobs: list[str]) -> str:
    lines = ["| job | scenario | before img/s | budgeted img/s | budgeted / before | budgeted / before, per round "
             "(median) | budgeted / its alone | intra-op threads at the end (before, budgeted) |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | --- |"]
    for job in jobs:
        alone = statistics.median(r for r, _ in results.get((job, "alone", "budgeted"), [(float("nan"), 0)]))
        for scenario in scenarios:
            runs = {s: results.get((job, scenario, s)) for s in ("before", "budgeted")}
            if not all(runs.values()):
                continue
            before, budgeted = (statistics.median(r for r, _ in runs[s]) for s in ("before", "budgeted"))
            threads = ", ".join("/".join(str(t) for _, t in runs[s]) for s in ("before", "budgeted"))
            # a round runs both settings back to back: its ratio cancels the machine's slower drifts
            paired = [b / a for (a, _), (b, _) in zip(runs["before"], runs["budgeted"])]
            per_round = ", ".join(f"{r:.2f}" for r in paired) + f" ({statistics.median(paired):.2f})"
            lines.append(f"| {job} | {scenario} | {before:.0f} | {budgeted:.0f} | {budgeted / before:.2f} | "
                         f"{per_round} | {budgeted / alone:.2f} | {threads if job == 'train' else '-'} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="training steps per run (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=5, help="steps per measured interval (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; each runs every setting once (default: 2)")
    p.add_argument("--scenarios", default="alone,busy1,busy2,taskset1,quota1")
    p.add_argument("--jobs", default="train,shards", help="train, shards or both")
    p.add_argument("--per-class", type=int, default=600, help="CIFAR images per class (default: %(default)s)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mocostream-contention"))
    p.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))  # clean up busy loops and the cgroup
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.images = subset(extract(args.workdir) / "train", args.workdir / "subset", args.per_class)
    args.shards = args.workdir / "shards"
    if not (args.shards / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "mocostream.ops.cli", "shards", "create", str(args.images), "--out",
                        str(args.shards), "--format", "tar", "--samples-per-shard", "1000", "--shuffle", "--seed",
                        "0", "--reencode", "never", "--dedup", "none", "--quiet"], cwd=REPO, check=True)
    scenarios, jobs = args.scenarios.split(","), args.jobs.split(",")
    cgroup = OneCpuQuota.make() if "quota1" in scenarios else None
    if "quota1" in scenarios and cgroup is None:
        print("no cgroup can be made here: quota1 skipped", flush=True)
        scenarios.remove("quota1")
    results: dict = {}
    load = [os.getloadavg()[0]]
    try:
        for rnd in range(args.rounds):
            for job in jobs:
                for scenario in scenarios:
                    order = ("before", "budgeted") if rnd % 2 == 0 else ("budgeted", "before")
                    for setting in order:
                        t0 = time.monotonic()
                        rate = run_scenario(args, job, scenario, setting, cgroup)
                        results.setdefault((job, scenario, setting), []).append(rate)
                        load.append(os.getloadavg()[0])
                        print(f"round {rnd + 1} {job} {scenario} {setting}: {rate[0]:.1f} img/s, intra-op threads "
                              f"{rate[1]} ({time.monotonic() - t0:.0f} s, load {load[-1]:.1f})", flush=True)
    finally:
        if cgroup is not None:
            cgroup.rmdir()
    print(f"\n{len(os.sched_getaffinity(0))} CPUs; 1-minute load average during the runs: min {min(load):.1f}, "
          f"median {statistics.median(load):.1f}, max {max(load):.1f} (includes the bench's own processes)\n")
    print(table(results, scenarios, jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
