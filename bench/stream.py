"""Streaming benchmark (issue 5): object storage vs local disk, and resume latency.

    python bench/stream.py --images /tmp/wp/jpg --seconds 20
    python bench/stream.py --seconds 20 --backend opencv         # generated images, opencv backend

1. Loader throughput, S3 vs local. A real SeaweedFS server is started on 127.0.0.1 (tests/helpers.py's
   S3Server). The images are made into tar shards twice, with the same options: into a local temp folder and
   into `s3://bench/shards`. The loader alone (TwoViewLoader, two 224-px MoCo v2 views, batch 32, 2 workers,
   read-ahead 2) is then run over each in turn, local / S3 / local / S3 (`--rounds` each) after an unmeasured
   warm-up run, every round a fresh loader whose first batch is a warm-up; images are counted for `--seconds`.
   Reported: the mean images/s of each and s3/local (target >= 0.95), also per round. On a shared machine,
   compare the per-round ratios, the load average printed with each round, and images per CPU-second of
   the loader process (DALI backend; SeaweedFS's own CPU is not in it).
2. Resume latency, 1,000 shards in the manifest: 4,000 generated 64-px images -> 1,000 tar shards of 4. The
   real trainer (`python -m mocostream.ops.cli train`) runs 3 steps and checkpoints. Then a fresh Python process resumes
   the loader exactly as the trainer does on `--resume` (checkpoint.latest + load, loader.load_states) and
   takes its first batch; the figure is from just before the parent starts that process (interpreter start
   and imports included) to the first batch in hand. Inside that process the parts are timed too
   (imports, manifest + loader construction, checkpoint load, load_states, first batch), and, in process, a
   resume deep into the epoch and an elastic 2 -> 1 rank resume. Finally the wall time of the whole trainer
   resumed for one more step (`--resume --steps 4`: model, optimizer, one MoCo step, checkpoint, exit).

The last line printed is JSON with every figure. SeaweedFS is always stopped, even on errors.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from mocostream.pipeline.vocabulary import BACKEND_ALIASES, BACKENDS, DALI  # noqa: E402


# ---- 1. throughput --------------------------------------------------------------------------------------

class _Reads:
    """A storage observer counting shard reads, bytes and seconds."""

    def __init__(self):
        self.reads, self.bytes, self.seconds = 0, 0, 0.0

    def read(self, nbytes: int, seconds: float) -> None:
        self.reads += 1
        self.bytes += nbytes
        self.seconds += seconds

    def retry(self) -> None: ...

    def failed(self) -> None: ...


def measure_loader(data: str, backend: str, seconds: float, batch: int, size: int, workers: int,
                   read_ahead: int) -> dict:
    from mocostream.pipeline.loader import LoaderConfig, TwoViewLoader

    reads = _Reads()
    t0 = time.perf_counter()
    loader = TwoViewLoader(LoaderConfig(data=data, batch_size=batch, image_size=size, recipe="moco_v2",
                                        backend=backend, workers=workers, read_ahead=read_ahead), observer=reads)
    it = iter(loader)
    next(it)  # warm-up: pipeline build, first shard reads, worker start
    first = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    cpu0 = os.times()
    waits, last = [], t1
    while last - t1 < seconds:
        n += len(next(it).keys)
        now = time.perf_counter()
        waits.append(now - last)
        last = now
    dt = last - t1
    cpu1 = os.times()
    it.close()
    del it, loader
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)  # this process only (DALI threads included)
    return {"images": n, "seconds": round(dt, 2), "images_per_s": round(n / dt, 1),
            "first_batch_seconds": round(first, 2), "shard_reads": reads.reads,
            "read_mb": round(reads.bytes / 1e6, 1),
            "mean_shard_read_ms": round(1000 * reads.seconds / reads.reads, 1) if reads.reads else None,
            "process_cpu_s_per_wall_s": round(cpu / dt, 2),
            # steadier than images/s on a shared machine; dali only (opencv's worker processes are not counted)
            "images_per_process_cpu_s": round(n / cpu, 1) if cpu > 0 else None,
            "median_batch_wait_s": round(sorted(waits)[len(waits) // 2], 3), "max_batch_wait_s": round(max(waits), 3)}


def stream_benchmark(args, server, work: Path) -> dict:
    import s3fs  # noqa: F401  (fail early if missing)

    from mocostream.ops.demo import write_images
    from mocostream.shards.create import create_shards

    images = args.images
    if not images:
        images = str(work / "images")
        n = write_images(Path(images), per_class=64, size=args.generated_size)
        print(f"[stream] generated {n} images of {args.generated_size} px: {images}", flush=True)
    local = str(work / "shards")
    s3 = "s3://bench/shards"
    server.make_bucket("bench")
    t0 = time.perf_counter()
    r_local = create_shards([images], local, fmt="tar", samples_per_shard=50, progress=False)
    t1 = time.perf_counter()
    r_s3 = create_shards([images], s3, fmt="tar", samples_per_shard=50, progress=False)
    t2 = time.perf_counter()
    shard_mb = sum(p.stat().st_size for p in Path(local).glob("*.tar")) / 1e6
    print(f"[stream] {r_local.written} samples in {len(r_local.shards)} shards ({shard_mb:.1f} MB) "
          f"local in {t1 - t0:.1f} s, S3 in {t2 - t1:.1f} s", flush=True)
    if r_local.written != r_s3.written:
        raise RuntimeError(f"local and S3 shard sets differ: {r_local.written} vs {r_s3.written} samples")

    if args.warmup_seconds > 0:  # unmeasured: the process's first DALI pipeline / worker start, page cache
        w = measure_loader(local, args.backend, args.warmup_seconds, args.batch_size, args.image_size,
                           args.workers, args.read_ahead)
        print(f"[stream] warm-up (local, not counted): {w['images_per_s']:.1f} images/s, "
              f"first batch {w['first_batch_seconds']} s", flush=True)
    rounds = {"local": [], "s3": []}
    for i in range(args.rounds):
        for where, data in (("local", local), ("s3", s3)):
            r = measure_loader(data, args.backend, args.seconds, args.batch_size, args.image_size,
                               args.workers, args.read_ahead)
            rounds[where].append(r)
            print(f"[stream] round {i + 1} {where:>5}: {r['images_per_s']:7.1f} images/s "
                  f"({r['images']} in {r['seconds']} s; first batch {r['first_batch_seconds']} s; "
                  f"{r['shard_reads']} shard reads, mean {r['mean_shard_read_ms']} ms; "
                  f"batch wait median {r['median_batch_wait_s']} s, max {r['max_batch_wait_s']} s; "
                  f"load {os.getloadavg()[0]:.2f})", flush=True)
    mean = {w: round(sum(r["images_per_s"] for r in rs) / len(rs), 1) for w, rs in rounds.items()}
    per_cpu = {w: round(sum(r["images"] for r in rs) / sum(r["images"] / r["images_per_process_cpu_s"] for r in rs), 1)
               if all(r["images_per_process_cpu_s"] for r in rs) else None for w, rs in rounds.items()}
    return {"images_per_s_local": mean["local"], "images_per_s_s3": mean["s3"],
            "ratio": round(mean["s3"] / mean["local"], 3) if mean["local"] else None,
            "images_per_cpu_s_local": per_cpu["local"], "images_per_cpu_s_s3": per_cpu["s3"],
            "ratio_per_cpu_s": round(per_cpu["s3"] / per_cpu["local"], 3) if per_cpu["local"] and per_cpu["s3"] else None,
            "ratio_per_round": [round(b["images_per_s"] / a["images_per_s"], 3)
                                for a, b in zip(rounds["local"], rounds["s3"])],
            "samples": r_local.written, "shards": len(r_local.shards), "shard_mb": round(shard_mb, 1),
            "rounds": rounds}


# ---- 2. resume latency ----------------------------------------------------------------------------------

# Run as `python -c CHILD <json args>`: the trainer's resume path for the loader, timed in parts.
CHILD = r"""
import json, sys, time
t_start = time.time()
a = json.loads(sys.argv[1])
sys.path.insert(0, a["repo"])
import torch
from mocostream.pipeline.loader import LoaderConfig, TwoViewLoader
from mocostream.pipeline.storage import Storage, StorageConfig
from mocostream.ops import checkpoint
if a["backend"] == "dali":
    import mocostream.pipeline.augment_dali  # DALI's own import counts as imports, not as loader work
t_imports = time.time()

def make(world=1, rank=0):
    # exactly as ops/train.py builds it (default TrainConfig, the flags of the run that made the checkpoint)
    return TwoViewLoader(LoaderConfig(
        data=a["data"], batch_size=a["batch_size"], image_size=a["image_size"], recipe="moco_v2",
        backend=a["backend"], seed=0, rank=rank, world=world, workers=a["workers"], device="cpu", device_id=None,
        shuffle_shards=4, read_ahead=2, read_ahead_bytes=1024 << 20, epochs=None,
        storage=StorageConfig(retries=5, read_timeout=60.0)))

loader = make()
t_loader = time.time()
storage = Storage(loader.cfg.storage)
path = checkpoint.latest(a["ckpt"], storage=storage)
state = checkpoint.load(path, a["ckpt"], storage=storage)
t_ckpt = time.time()
loader.load_states(state["loader"])
t_states = time.time()
it = iter(loader)
batch = next(it)
t_first = time.time()
out = {"checkpoint": path, "loader_state": state["loader"], "first_keys": batch.keys[:3],
       "t_start": t_start, "t_first": t_first,
       "imports_s": t_imports - t_start, "loader_build_s": t_loader - t_imports, "checkpoint_load_s": t_ckpt - t_loader,
       "load_states_s": t_states - t_ckpt, "first_batch_after_states_s": t_first - t_states}
it.close(); del it, loader

def first_batch(states, world=1):
    ld = make(world)
    t0 = time.perf_counter()
    ld.load_states(states)
    t1 = time.perf_counter()
    st = ld.stream
    lay = st.layout(st.epoch)
    next(st._plan(st.epoch, lay).segments(st._share(lay)[0]), None)
    t2 = time.perf_counter()
    it = iter(ld)
    next(it)
    t3 = time.perf_counter()
    it.close()
    return {"load_states_s": t1 - t0, "plan_s": t2 - t1, "first_batch_s": t3 - t0}

# Deep into the epoch: the same trainer state, but 90 % of the epoch consumed.
s = dict(state["loader"])
total = int(make().stream.counts.sum())
s["ranks"] = [[s["ranks"][0][0], int(total * 0.9)]]
out["deep"] = dict(first_batch(s), position=s["ranks"][0][1])
# Elastic: two ranks' states (each 40 % into its share) resumed on one rank.
half = total // 2
two = dict(state["loader"], world=2, ranks=[[s["ranks"][0][0], int(half * 0.4)]] * 2)
out["elastic_2_to_1"] = first_batch(two)
print("RESULT " + json.dumps(out), flush=True)
"""


def _train_cmd(data: str, ckpt: str, steps: int, backend: str) -> list[str]:
    return [sys.executable, "-m", "mocostream.ops.cli", "train", "--data", data, "--steps", str(steps), "--batch-size", "8",
            "--arch", "resnet18", "--image-size", "32", "--queue-size", "64", "--backend", backend,
            "--metrics-port", "0", "--checkpoint-dir", ckpt, "--no-progress", "--workers", "1"]


def resume_benchmark(args, server, work: Path) -> dict:
    from mocostream.ops.demo import write_images
    from mocostream.shards.create import create_shards

    t0 = time.perf_counter()
    images = work / "resume-images"
    per_class = args.resume_shards * 4 // 8  # 8 classes, 4 images per shard
    write_images(images, per_class=per_class, size=64, seed=1)
    data = str(work / "resume-shards")
    report = create_shards([str(images)], data, fmt="tar", samples_per_shard=4, progress=False)
    manifest = json.loads(Path(data, "manifest.json").read_text())
    n_shards = len(manifest["shards"])
    print(f"[resume] {report.written} samples in {n_shards} shards in the manifest "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    if args.resume_s3:
        fs = server.filesystem()
        server.make_bucket("bench")
        t = time.perf_counter()
        fs.put(data + "/", "bench/resume/", recursive=True)
        data = "s3://bench/resume"
        print(f"[resume] uploaded to {data} ({time.perf_counter() - t:.1f} s)", flush=True)

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ckpt = str(work / "checkpoints")
    t = time.perf_counter()
    p = subprocess.run(_train_cmd(data, ckpt, 3, args.resume_backend), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"training run failed ({p.returncode}):\n{p.stderr[-3000:]}")
    print(f"[resume] trained 3 steps and checkpointed ({time.perf_counter() - t:.1f} s)", flush=True)

    child_args = json.dumps({"repo": str(REPO), "data": data, "ckpt": ckpt, "batch_size": 8, "image_size": 32,
                             "backend": args.resume_backend, "workers": 1})
    runs = []
    for _ in range(args.resume_repeats):
        t_parent = time.time()
        p = subprocess.run([sys.executable, "-c", CHILD, child_args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            raise RuntimeError(f"resume child failed ({p.returncode}):\n{p.stderr[-3000:]}")
        r = json.loads(line[len("RESULT "):])
        r["process_start_to_first_batch_s"] = r["t_first"] - t_parent
        r["interpreter_start_s"] = r["t_start"] - t_parent
        runs.append(r)
        print(f"[resume] process start -> first batch {r['process_start_to_first_batch_s']:.2f} s "
              f"(interpreter {r['interpreter_start_s']:.2f}, imports {r['imports_s']:.2f}, "
              f"loader {r['loader_build_s']:.2f}, checkpoint {r['checkpoint_load_s']:.3f}, "
              f"load_states {r['load_states_s'] * 1000:.2f} ms, first batch {r['first_batch_after_states_s']:.2f})",
              flush=True)

    t = time.perf_counter()
    p = subprocess.run(_train_cmd(data, ckpt, 4, args.resume_backend) + ["--resume"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    trainer_s = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"resumed training run failed ({p.returncode}):\n{p.stderr[-3000:]}")
    resumed = Path(ckpt, "checkpoint-00000004.pt").exists()
    print(f"[resume] whole trainer --resume --steps 4 (one step, checkpoint, exit): {trainer_s:.1f} s", flush=True)

    best = min(runs, key=lambda r: r["process_start_to_first_batch_s"])
    last = runs[-1]
    return {"resume_shards_in_manifest": n_shards, "resume_data": data,
            "resume_first_batch_seconds": round(best["process_start_to_first_batch_s"], 2),
            "resume_first_batch_seconds_runs": [round(r["process_start_to_first_batch_s"], 2) for r in runs],
            "resume_interpreter_start_seconds": round(best["interpreter_start_s"], 3),
            "resume_imports_seconds": round(best["imports_s"], 2),
            "resume_loader_build_seconds": round(best["loader_build_s"], 3),
            "resume_checkpoint_load_seconds": round(best["checkpoint_load_s"], 3),
            "resume_load_states_seconds": round(best["load_states_s"], 6),
            "resume_first_batch_after_states_seconds": round(best["first_batch_after_states_s"], 2),
            "resume_loader_state": last["loader_state"],
            "resume_deep_position": last["deep"]["position"],
            "resume_deep_load_states_seconds": round(last["deep"]["load_states_s"], 6),
            "resume_deep_plan_seconds": round(last["deep"]["plan_s"], 4),
            "resume_deep_first_batch_seconds": round(last["deep"]["first_batch_s"], 2),
            "resume_elastic_load_states_seconds": round(last["elastic_2_to_1"]["load_states_s"], 6),
            "resume_elastic_plan_seconds": round(last["elastic_2_to_1"]["plan_s"], 4),
            "resume_elastic_first_batch_seconds": round(last["elastic_2_to_1"]["first_batch_s"], 2),
            "resume_trainer_process_seconds": round(trainer_s, 1),
            "resume_trainer_wrote_step_4": resumed}


def start_s3(workdir: Path):
    """The real SeaweedFS server of the test suite (tests/helpers.py)."""
    import helpers

    return helpers.S3Server(workdir)


# ---- main -----------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="a folder of images (default: generate 512 with ops.demo.write_images)")
    p.add_argument("--generated-size", type=int, default=384, help="side of generated images, px")
    p.add_argument("--backend", default=DALI, choices=[*BACKENDS, *BACKEND_ALIASES])
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds of local then S3")
    p.add_argument("--warmup-seconds", type=float, default=5.0, help="an unmeasured local run first")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--read-ahead", type=int, default=2, help="shard blocks fetched ahead")
    p.add_argument("--resume-shards", type=int, default=1000)
    p.add_argument("--resume-repeats", type=int, default=2, help="resume child processes (best is reported)")
    p.add_argument("--resume-backend", default=DALI, choices=[*BACKENDS, *BACKEND_ALIASES])
    p.add_argument("--resume-s3", action="store_true", help="resume from the shards on SeaweedFS, not local disk")
    p.add_argument("--skip-stream", action="store_true")
    p.add_argument("--skip-resume", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    server = None
    result: dict = {"backend": args.backend, "cores": os.cpu_count(), "batch_size": args.batch_size,
                    "image_size": args.image_size, "workers": args.workers, "read_ahead": args.read_ahead,
                    "seconds": args.seconds, "images": args.images or "generated",
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    t0 = time.perf_counter()
    try:
        (work / "seaweedfs").mkdir()
        server = start_s3(work / "seaweedfs")
        os.environ.update(server.env)
        print(f"[s3] SeaweedFS on {server.endpoint}", flush=True)
        if not args.skip_stream:
            result.update(stream_benchmark(args, server, work))
        if not args.skip_resume:
            result.update(resume_benchmark(args, server, work))
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"[bench] work folder kept: {work}")
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)

    print()
    rows = []
    if "ratio" in result:
        rows += [(f"loader images/s, local disk ({args.backend})", result["images_per_s_local"]),
                 (f"loader images/s, SeaweedFS S3 on loopback ({args.backend})", result["images_per_s_s3"]),
                 ("ratio s3/local (target >= 0.95)", result["ratio"]),
                 ("  per round (s3 round i / local round i)", result["ratio_per_round"]),
                 ("images per CPU-second of the loader process, local / S3",
                  f"{result['images_per_cpu_s_local']} / {result['images_per_cpu_s_s3']}"),
                 ("  ratio s3/local per CPU-second (SeaweedFS's own CPU not counted)", result["ratio_per_cpu_s"])]
    if "resume_first_batch_seconds" in result:
        rows += [(f"resume: process start -> first batch, {result['resume_shards_in_manifest']} shards (s)",
                  result["resume_first_batch_seconds"]),
                 ("  of which interpreter start + imports (s)",
                  round(result["resume_interpreter_start_seconds"] + result["resume_imports_seconds"], 2)),
                 ("  of which manifest + loader build (s)", result["resume_loader_build_seconds"]),
                 ("  of which checkpoint load (s)", result["resume_checkpoint_load_seconds"]),
                 ("  of which load_states (s)", result["resume_load_states_seconds"]),
                 ("  of which first batch after load_states (s)", result["resume_first_batch_after_states_seconds"]),
                 ("resume 90% into the epoch: load_states + first batch, in process (s)",
                  result["resume_deep_first_batch_seconds"]),
                 ("elastic 2 -> 1 resume: load_states + first batch, in process (s)",
                  result["resume_elastic_first_batch_seconds"]),
                 ("whole trainer --resume, one step + checkpoint + exit (s)", result["resume_trainer_process_seconds"])]
    width = max((len(r[0]) for r in rows), default=10)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"load average start {result['loadavg_start']}, end {result['loadavg_end']}; "
          f"{result['cores']} cores; wall {result['wall_seconds']} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
