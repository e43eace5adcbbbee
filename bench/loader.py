"""Loader throughput: two augmented views per image (v2 recipe), the loader alone, no training.

    python bench/loader.py --images /tmp/wp/jpg --backend all --reference --rounds 3 --seconds 20
    python bench/loader.py --images /tmp/wp/jpg --backend dali --profile          # where the CPU goes
    python bench/loader.py --images /tmp/wp/jpg --backend dali --feed-only        # the CPU path in front of a GPU

Each measurement runs in a fresh process (so process CPU time is its own), after a warm-up. Rounds
alternate the order of the backends, so load drift on a shared machine hits all of them; the summary gives
each round and the median ratio to the reference of the same round.

  dali, opencv  the streaming loader (pipeline.loader) from tar shards: read, parse, check, feed, augment
  --reference   the reference MoCo v2 recipe (PIL decode + torchvision aug+ with PIL's blur, twice), one
                process per core on the same photos held in memory: it pays no I/O, the fairest baseline
  --feed-only   dali only: the DALI graph is replaced by one that takes the same external_source inputs and
                does nothing with them, so what is measured is the CPU path a GPU node runs on its cores
  --profile     per stage CPU ms per image: read (shard bytes), parse (tar/parquet -> samples), check
                (pre-flight image check), feed (building each batch's external_source inputs, crop
                windows included), collate (outputs -> Batch on the training thread), graph (DALI's own
                threads: decode + augment) or workers (opencv: decode + augment in worker processes)

The last line is JSON: every round, the medians and (with --profile) the stage breakdown.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # bench/augment.py; after the repo (bench/shards.py)

from mocostream.pipeline.vocabulary import BACKEND_ALIASES, BACKENDS, DALI, OPENCV  # noqa: E402

STAGES = ("read", "parse", "check", "feed", "collate")


def descendants_cpu(pid: int) -> float:
    """CPU seconds of every live descendant of `pid` (worker processes, a forkserver's children)."""
    children, cpu = defaultdict(list), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(entry))
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, list(children[pid])
    while todo:
        p = todo.pop()
        total += cpu.get(p, 0.0)
        todo += children[p]
    return total


class StageClock:
    """Thread CPU time spent inside wrapped functions, per stage (and how much of it on the main thread)."""

    def __init__(self):
        self.cpu, self.main = defaultdict(float), defaultdict(float)
        self.lock = threading.Lock()

    def wrap(self, stage: str, fn, consume: bool = False):
        @functools.wraps(fn)  # same signature: DALI inspects its source callback's arguments
        def timed(*args, **kwargs):
            t0 = time.thread_time()
            try:
                out = fn(*args, **kwargs)
                return list(out) if consume else out
            finally:
                dt = time.thread_time() - t0
                with self.lock:
                    self.cpu[stage] += dt
                    if threading.current_thread() is threading.main_thread():
                        self.main[stage] += dt
        return timed

    def reset(self) -> None:
        with self.lock:
            self.cpu.clear()
            self.main.clear()


def install_profile(clock: StageClock) -> None:
    """Wrap each stage's function where the loader looks it up (at call time)."""
    import mocostream.pipeline.augment_dali as augment_dali
    import mocostream.pipeline.image_check as image_check
    import mocostream.pipeline.storage as storage
    import mocostream.pipeline.stream as stream

    storage.ShardReader.read = clock.wrap("read", storage.ShardReader.read)
    stream.read_samples = clock.wrap("parse", stream.read_samples, consume=True)
    image_check.check_image = clock.wrap("check", image_check.check_image)
    graph = augment_dali._two_view_graph
    augment_dali._two_view_graph = lambda feed, *a, **k: graph(clock.wrap("feed", feed), *a, **k)


def install_feed_only() -> None:
    """Swap the DALI graph for one that takes the same inputs and passes the ids through."""
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    import mocostream.pipeline.augment_dali as augment_dali

    @pipeline_def(enable_conditionals=True)
    def feed_only(feed, size, decoder_device):
        outputs = fn.external_source(source=feed, num_outputs=augment_dali.FEED_OUTPUTS, batch=True)
        ids = outputs[1]
        return ids, ids, ids

    augment_dali._two_view_graph = feed_only


def measure_loader(args, backend: str) -> dict:
    from mocostream.pipeline.loader import LoaderConfig, TwoViewLoader

    clock = StageClock()
    if args.feed_only:
        install_feed_only()
    if args.profile:
        install_profile(clock)
    loader = TwoViewLoader(LoaderConfig(data=args.data, batch_size=args.batch_size, image_size=args.image_size,
                                        recipe="moco_v2", backend=backend, workers=args.workers, seed=0,
                                        preflight=args.preflight))
    it = iter(loader)
    for _ in range(3):  # warm-up: pipeline build, first shard reads, worker start
        next(it)
    clock.reset()
    me = os.getpid()
    n, collate = 0, 0.0
    t0, cpu0, kids0 = time.perf_counter(), time.process_time(), descendants_cpu(me)
    while time.perf_counter() - t0 < args.seconds:
        m0 = time.thread_time()
        main_stages = sum(clock.main.values())
        b = next(it)
        collate += (time.thread_time() - m0) - (sum(clock.main.values()) - main_stages)
        n += len(b.keys)
    dt, cpu, kids = time.perf_counter() - t0, time.process_time() - cpu0, descendants_cpu(me) - kids0
    it.close()
    out = {"name": backend + ("-feed" if args.feed_only else ""), "images": n, "seconds": round(dt, 2),
           "images_per_s": round(n / dt, 1), "cpu_ms_per_image": round((cpu + kids) / n * 1e3, 3),
           "images_per_cpu_s": round(n / (cpu + kids), 1), "skipped": dict(loader.skipped)}
    if args.profile:
        stages = {s: clock.cpu.get(s, 0.0) for s in STAGES[:-1]}
        stages["collate"] = collate
        rest = "workers" if backend == OPENCV else "graph"
        stages[rest] = (kids if backend == OPENCV else 0.0) + cpu - sum(stages.values())
        out["profile_ms_per_image"] = {k: round(v / n * 1e3, 3) for k, v in stages.items()}
    return out


def measure_reference(args) -> dict:
    from augment import bench_processes

    from mocostream.pipeline.readers import read_samples
    from mocostream.pipeline.filesystems import Storage
    from mocostream.pipeline.sources import resolve_shards

    storage = Storage()
    blobs = [s.data for sh in resolve_shards(args.data, storage=storage)
             for s in read_samples(sh, storage.read_bytes(sh.url)) if not s.error]
    ips, cpu_ms = bench_processes("reference", argparse.Namespace(images=blobs, recipe="moco_v2",
                                                                 size=args.image_size, seconds=args.seconds,
                                                                 workers=args.workers))
    return {"name": "reference", "images_per_s": round(ips, 1), "cpu_ms_per_image": round(cpu_ms, 3)}


def run_one(args, name: str) -> dict:
    """One measurement in a fresh interpreter: its CPU time is its own."""
    cmd = [sys.executable, __file__, "--one", name, "--data", args.data, "--seconds", str(args.seconds),
           "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
           "--workers", str(args.workers), "--preflight", args.preflight]
    cmd += ["--profile"] * args.profile + ["--feed-only"] * name.endswith("-feed")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="shards (manifest, folder, pattern or s3:// prefix)")
    src.add_argument("--images", help="a folder of images, made into tar shards first (by `shards create`)")
    p.add_argument("--backend", default=DALI, choices=[*BACKENDS, "reference", "all", *BACKEND_ALIASES])
    p.add_argument("--reference", action="store_true", help="also run the reference recipe (the ratio baseline)")
    p.add_argument("--feed-only", action="store_true", help="dali: the feed path alone, no decode/augment graph")
    p.add_argument("--profile", action="store_true", help="per stage CPU ms per image")
    p.add_argument("--preflight", default="auto", choices=["auto", "always", "never"],
                   help="the loader's pre-flight image check (auto: skipped for validated shards)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per measurement")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes (opencv, reference) or threads (dali)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.backend = BACKEND_ALIASES.get(args.backend, args.backend)

    if args.one:
        r = measure_reference(args) if args.one == "reference" else measure_loader(args, args.one.removesuffix("-feed"))
        print(json.dumps(r))
        return
    if args.images:
        from mocostream.shards.create import create_shards

        args.data = tempfile.mkdtemp(prefix="bench-shards-")
        create_shards([args.images], args.data, fmt="tar", samples_per_shard=100, progress=False, dedup="none")
    names = {"all": list(BACKENDS), "reference": []}.get(args.backend, [args.backend])
    if args.feed_only:
        if names != ["dali"]:
            raise SystemExit("error: --feed-only measures the dali backend only")
        names = ["dali-feed"]
    names += ["reference"] * (args.reference or args.backend == "reference")
    print(f"load average at start: {load_average()}", flush=True)
    rounds = []
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        results = {name: run_one(args, name) for name in order}
        if "reference" in results:
            for res in results.values():
                res["vs_reference"] = round(res["images_per_s"] / results["reference"]["images_per_s"], 3)
        rounds.append({"load": load_average(), "results": results})
        print(f"round {r + 1} (load {rounds[-1]['load']}): " + ", ".join(
            f"{k} {v['images_per_s']:.1f} img/s ({v['cpu_ms_per_image']:.2f} CPU-ms/img"
            + (f", {v['vs_reference']:.2f}x" if "vs_reference" in v else "") + ")" for k, v in results.items()),
            flush=True)
        for k, v in results.items():
            if "profile_ms_per_image" in v:
                stages = v["profile_ms_per_image"].items()
                print(f"    {k} CPU ms/image: " + ", ".join(f"{s} {ms:.3f}" for s, ms in stages))
    summary = {}
    for name in names:
        runs = [rd["results"][name] for rd in rounds]
        summary[name] = {"images_per_s": statistics.median(x["images_per_s"] for x in runs),
                         "cpu_ms_per_image": statistics.median(x["cpu_ms_per_image"] for x in runs)}
        if "vs_reference" in runs[0]:
            summary[name]["vs_reference"] = statistics.median(x["vs_reference"] for x in runs)
        if "profile_ms_per_image" in runs[0]:
            summary[name]["profile_ms_per_image"] = {
                s: round(statistics.median(x["profile_ms_per_image"][s] for x in runs), 3)
                for s in runs[0]["profile_ms_per_image"]}
        if "images_per_cpu_s" in runs[0]:
            summary[name]["images_per_cpu_s"] = statistics.median(x["images_per_cpu_s"] for x in runs)
    print("median: " + json.dumps(summary))
    print(json.dumps({"images_per_s": summary[names[0]]["images_per_s"], "rounds": rounds, "median": summary,
                      "load_end": load_average(), "cores": os.cpu_count(),
                      "workers": args.workers, "image_size": args.image_size, "batch_size": args.batch_size,
                      "seconds": args.seconds, "recipe": "moco_v2"}))


if __name__ == "__main__":
    main()
