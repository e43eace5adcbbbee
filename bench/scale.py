"""Web-scale stream benchmark: the project's own plan, manifest and resume code on synthetic shard lists of
1k to 1M shards (about 1,000 samples each: 1B images at 1M) and 8 / 64 / 1,024 ranks.

    python bench/scale.py                       # 1k, 10k, 100k, 1M shards
    python bench/scale.py --shards 1000 100000  # a subset

Every figure comes from a fresh child process (`--child ...`); each step is run for its peak memory, then
again, timed alone (Python and numpy allocations by tracemalloc, plus pyarrow's memory pool).
1. plan: one rank's epoch plan (EpochPlan: the shuffled shard order and its cumulative counts) built, and then
   its whole share walked block by block with every block's read order drawn (the work spread over an epoch).
2. manifest: manifest.parquet (written by shards.manifest.write_manifests) read into a shard table by one rank;
   then the shard list fingerprint (what a checkpoint records). The JSON manifest read (`read_manifest`, every
   shard a Python object) up to 100k shards for comparison.
3. scale-up: an 8-rank checkpoint 40 % into the epoch resumed on 1,024 ranks: one new rank's load_states and
   its first block found (what it does before its first read).
4. resizes: 10 resizes in one epoch (1,024 -> 512 -> ... -> 1,024 ranks, every rank a random way into its
   share each time): the loader part of the checkpoint (torch.save bytes), load_states on 1,024 ranks (same
   world) and into an 896-rank world (elastic), progress() (first call in an epoch, then per call).
The last line printed is JSON with every figure.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESIZE_WORLDS = [1024, 512, 1024, 768, 1024, 256, 1024, 640, 384, 1024, 1024]  # 10 resizes, ending at 1,024


def measured(fn, setup=lambda: None, repeats: int = 3):
    """(result, seconds, peak MB) of fn(setup()): run once for its memory (the peak of Python and numpy
    allocations by tracemalloc plus the growth of pyarrow's memory pool peak), then timed alone: the best of
    `repeats` runs (a shared machine), each on a fresh setup() that is not timed."""
    import tracemalloc

    pool = _arrow_pool()
    before = pool.max_memory() if pool else 0
    arg = setup()
    tracemalloc.start()
    result = fn(arg)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    arrow = (pool.max_memory() - before) if pool else 0
    del result, arg
    times = []
    for _ in range(repeats):
        arg = setup()
        t0 = time.perf_counter()
        result = fn(arg)
        times.append(time.perf_counter() - t0)
    return result, min(times), (peak + arrow) / 2**20


def _arrow_pool():
    if "pyarrow" not in sys.modules:
        return None
    import pyarrow as pa

    return pa.default_memory_pool()


def synthetic_counts(shards: int):
    import numpy as np

    return np.random.default_rng(shards).integers(900, 1101, shards)  # ~1,000 samples a shard


def synthetic_table(shards: int):
    import pyarrow as pa

    from mocostream.pipeline.shard_table import ShardTable

    names = pa.array([f"shard-{i:07d}.tar" for i in range(shards)], pa.string())
    return ShardTable("/data", names, synthetic_counts(shards))


# ---- children ---------------------------------------------------------------------------------------

def child_plan(shards: int, world: int) -> dict:
    import numpy as np

    from mocostream.pipeline.plan import EpochPlan

    counts = synthetic_counts(shards)
    rank = world // 2
    plan, built_s, built_mb = measured(lambda _: EpochPlan(counts, 0, 0, 4, world))

    def walk(fresh) -> int:  # the whole share, block by block, each block's read order drawn (kept: worst case)
        n = 0
        for seg in fresh.segments(np.array([[rank * fresh.per0, (rank + 1) * fresh.per0]])):
            seg.ref.order
            n += seg.stop - seg.start
        return n

    n, walk_s, walk_mb = measured(walk, lambda: EpochPlan(counts, 0, 0, 4, world), repeats=1)
    assert n == plan.per0
    return {"plan_build_s": built_s, "plan_build_mb": built_mb, "walk_s": walk_s, "walk_mb": walk_mb,
            "walk_blocks": plan.block_count(rank), "samples_per_rank": n}


def child_manifest(folder: str, json_too: bool) -> dict:
    import pyarrow.compute  # noqa: F401  (imports are not the manifest's cost)
    import pyarrow.parquet  # noqa: F401

    from mocostream.pipeline.filesystems import Storage
    from mocostream.pipeline.shard_table import load_shard_table
    from mocostream.pipeline.sources import read_manifest

    storage = Storage()
    table, seconds, mb = measured(lambda _: load_shard_table(folder, storage=storage))
    _, fp_s, fp_mb = measured(lambda _: table.fingerprint(), table._fingerprints.clear)
    out = {"columnar_s": seconds, "columnar_mb": mb, "shards": len(table), "fingerprint_s": fp_s,
           "fingerprint_mb": fp_mb}
    if json_too:
        del table
        _, out["json_s"], out["json_mb"] = measured(lambda _: read_manifest(folder + "/manifest.json", storage=storage),
                                                        repeats=1)
    return out


def _stream(table, world: int, rank: int):
    from mocostream.pipeline.stream import SampleStream

    return SampleStream(table, seed=0, world=world, rank=rank)


def child_scale_up(shards: int) -> dict:
    table = synthetic_table(shards)
    old = _stream(table, 8, 0)
    share = old.share_length(0)
    state = old.checkpoint_state([[0, int(share * 0.4) + r] for r in range(8)])

    def join(new):
        new.load_states(state)
        return next(new._groups())  # its first block found: the plan and its share located

    def setup():
        table._fingerprints.clear()  # the joining rank checks the shard list: part of its cost
        return _stream(table, 1024, 1000)

    first, seconds, mb = measured(join, setup)
    return {"scale_up_s": seconds, "scale_up_mb": mb, "first_block_pieces": len(first.block.pieces)}


def child_resizes(shards: int) -> dict:
    import numpy as np
    import torch

    table = synthetic_table(shards)
    rng = np.random.default_rng(1)
    state = None
    for world in RESIZE_WORLDS:
        s = _stream(table, world, 0)
        if state is not None:
            s.load_states(state)
        share = s.share_length(s.epoch)
        state = s.checkpoint_state([[0, int(x)] for x in rng.integers(0, share // 10 + 1, world)])
    buffer = io.BytesIO()
    torch.save(state, buffer)
    out = {"resizes": len(RESIZE_WORLDS) - 1, "pool_intervals": len(state["layouts"][0]["pool"]) // 2,
           "checkpoint_loader_bytes": len(buffer.getvalue())}
    for name, world in (("same_world", 1024), ("elastic", 896)):
        _, out[f"load_states_{name}_s"], out[f"load_states_{name}_mb"] = measured(
            lambda s: s.load_states(state),  # the fingerprint check included
            lambda: table._fingerprints.clear() or _stream(table, world, world - 1))
        s = _stream(table, world, world - 1)
        s.load_states(state)
        t1 = time.perf_counter()
        s.progress()
        out[f"progress_first_{name}_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        for _ in range(1000):
            s.progress()
        out[f"progress_{name}_s"] = (time.perf_counter() - t2) / 1000
    return out


# ---- parent -----------------------------------------------------------------------------------------

def run_child(*args) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def write_manifest(folder: Path, shards: int) -> None:
    """A synthetic manifest of `shards` entries through the shard tool's own writer."""
    import numpy as np

    from mocostream.pipeline.filesystems import Storage
    from mocostream.shards.manifest import build_manifest, write_manifests
    from mocostream.shards.output import Destination

    counts, rng = synthetic_counts(shards), np.random.default_rng(7)
    digests = rng.integers(0, 256, (shards, 32), dtype=np.uint8)
    entries = [{"name": f"shard-{i:07d}.tar", "samples": int(c), "bytes": int(c) * 110_000, "sha256": digests[i].tobytes().hex()}
               for i, c in enumerate(counts.tolist())]
    dest = Destination(str(folder), storage=Storage())
    write_manifests(dest, {"tar": "manifest.json"}, {"tar": build_manifest("tar", {}, entries, [], 0.0)})
    dest.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--worlds", type=int, nargs="+", default=[8, 64, 1024])
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        fn = {"plan": child_plan, "manifest": child_manifest, "scale_up": child_scale_up, "resizes": child_resizes}[kind]
        conv = [int(x) if x.isdigit() else (x == "True" if x in ("True", "False") else x) for x in rest]
        print(json.dumps(fn(*conv)))
        return
    result = {"plan": {}, "manifest": {}, "scale_up": {}, "resizes": {}}
    for n in args.shards:
        for world in args.worlds:
            r = result["plan"][f"{n}x{world}"] = run_child("plan", n, world)
            print(f"plan {n:>9,} shards {world:>5} ranks: build {r['plan_build_s']:.3f} s {r['plan_build_mb']:.1f} MB, "
                  f"whole share walked ({r['walk_blocks']:,} blocks) {r['walk_s']:.2f} s +{r['walk_mb']:.1f} MB",
                  flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            write_manifest(Path(tmp), n)
            mb = os.path.getsize(Path(tmp) / "manifest.json") / 2**20
            r = result["manifest"][n] = run_child("manifest", tmp, n <= 100_000)
            r["json_file_mb"], r["parquet_file_mb"] = mb, os.path.getsize(Path(tmp) / "manifest.parquet") / 2**20
            print(f"manifest {n:>9,} shards: parquet ({r['parquet_file_mb']:.1f} MB) {r['columnar_s']:.3f} s "
                  f"{r['columnar_mb']:.1f} MB, fingerprint {r['fingerprint_s']:.3f} s"
                  + (f"; json ({mb:.1f} MB) {r['json_s']:.2f} s {r['json_mb']:.1f} MB" if "json_s" in r else ""),
                  flush=True)
        r = result["scale_up"][n] = run_child("scale_up", n)
        print(f"scale-up 8 -> 1,024 at {n:,} shards: {r['scale_up_s']:.3f} s, {r['scale_up_mb']:.1f} MB", flush=True)
        r = result["resizes"][n] = run_child("resizes", n)
        print(f"10 resizes at {n:,} shards: {r['pool_intervals']} intervals, loader part {r['checkpoint_loader_bytes']:,} B, "
              f"load_states {r['load_states_same_world_s'] * 1e3:.1f} ms (elastic {r['load_states_elastic_s'] * 1e3:.1f} ms), "
              f"progress first {r['progress_first_same_world_s'] * 1e3:.2f} ms then {r['progress_same_world_s'] * 1e6:.2f} us",
              flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
