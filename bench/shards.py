"""Shard creation throughput: `mocostream shards create` against a plain PIL loop + webdataset ShardWriter.

    python bench/shards.py                       # extracts ../shared/data/webphotos.tar.gz jpg/ itself
    python bench/shards.py --images /tmp/wp/jpg --repeat 3

Each input photo is listed `--repeat` times (a path list, so every copy is a separate input with its own
key; dedup is off so all are decoded and written). Measured in one run, side by side:
  - ours, --workers 1 and 2, `--reencode never` (validate only: full decode, original bytes kept) and
    `--max-size 512` (decode, resize, re-encode JPEG q95), each as a real CLI process;
  - baseline: one process, PIL `Image.open` + `load()` (+ EXIF transpose, RGB, `thumbnail(512)`,
    `save(JPEG q95)` for the re-encode case) writing with webdataset's `ShardWriter`.
images/s = inputs / the tool's own wall time (discovery, worker start-up and shard writing included).
Peak memory = the highest sum of RSS over the CLI process and its workers, sampled every 20 ms; it is
also measured with --repeat doubled to show it does not grow with the input size.
The last line is JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def extract_webphotos(dest: Path) -> Path:
    archive = REPO.parent / "shared" / "data" / "webphotos.tar.gz"
    with tarfile.open(archive) as tf:
        members = [m for m in tf if m.isfile() and m.name.lstrip("./").startswith("jpg/")]
        tf.extractall(dest, members=members, filter="data")
    return dest / "jpg"


def _tree_rss(root: int) -> int:
    """Sum of RSS (bytes) of `root` and all its descendants (forkserver workers included)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            parents[int(d)] = int(parts[1])
            rss[int(d)] = int(parts[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier += kids
    return sum(rss.get(p, 0) for p in tree)


def run_ours(listfile: Path, out: Path, workers: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "ops.cli", "shards", "create", str(listfile), "--out", str(out), "--json",
           "--workers", str(workers), "--dedup", "none", "--samples-per-shard", "1000", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    stdout, stderr = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{stderr}")
    report = json.loads(stdout.strip().splitlines()[-1])
    return {"images_per_s": round(report["inputs"] / report["seconds"], 1), "inputs": report["inputs"],
            "written": report["written"], "seconds": report["seconds"], "peak_rss_mb": round(peak[0] / 2**20)}


def run_baseline(paths: list[str], out: Path, max_size: int) -> dict:
    """What one would write by hand: PIL validation in one process + webdataset's ShardWriter."""
    import webdataset as wds
    from PIL import Image, ImageOps

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    written = 0
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for i, path in enumerate(paths):
            with open(path, "rb") as f:
                data = f.read()
            try:
                img = Image.open(io.BytesIO(data))
                img.load()
                if max_size:
                    img = ImageOps.exif_transpose(img).convert("RGB")
                    img.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
                    buf = io.BytesIO()
                    img.save(buf, "JPEG", quality=95)
                    data = buf.getvalue()
            except Exception:
                continue
            sink.write({"__key__": f"{i:09d}", "jpg": data,
                        "json": json.dumps({"source": path, "width": img.width, "height": img.height}).encode()})
            written += 1
    dt = time.perf_counter() - t0
    return {"images_per_s": round(len(paths) / dt, 1), "inputs": len(paths), "written": written,
            "seconds": round(dt, 3), "peak_rss_mb": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", help="folder of JPEGs (default: extract webphotos jpg/ to a temp dir)")
    ap.add_argument("--repeat", type=int, default=3, help="list every photo this many times (default: 3)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    try:
        run(args, work)
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> None:
    images = Path(args.images) if args.images else extract_webphotos(work / "src")
    photos = sorted(str(p) for p in images.iterdir() if p.is_file())
    paths = photos * args.repeat
    listfile = work / "inputs.txt"
    listfile.write_text("\n".join(paths) + "\n")
    rows = []
    for mode, extra, max_size in (("validate (--reencode never)", ["--reencode", "never"], 0),
                                  ("re-encode (--max-size 512)", ["--max-size", "512"], 512)):
        base = run_baseline(paths, work / f"base-{max_size}", max_size)
        rows.append({"mode": mode, "tool": "PIL loop + wds.ShardWriter, 1 process", **base})
        for workers in (1, 2):
            r = run_ours(listfile, work / f"ours-{max_size}-{workers}", workers, extra)
            rows.append({"mode": mode, "tool": f"mocostream shards create --workers {workers}", **r})
    # memory vs input size: same options, twice the inputs
    big = work / "inputs2.txt"
    big.write_text("\n".join(paths * 2) + "\n")
    mem2 = run_ours(big, work / "ours-mem", 2, ["--max-size", "512"])
    print(f"\n{len(photos)} photos x {args.repeat} = {len(paths)} inputs; {os.cpu_count()} CPUs; load "
          f"{os.getloadavg()[0]:.2f}; {platform.machine()}, Python {platform.python_version()}")
    print(f"{'mode':30} {'tool':44} {'img/s':>8} {'vs base':>8} {'peak MB':>8}")
    for r in rows:
        ref = next(x for x in rows if x["mode"] == r["mode"] and x["tool"].startswith("PIL"))
        r["vs_baseline"] = round(r["images_per_s"] / ref["images_per_s"], 2)
        print(f"{r['mode']:30} {r['tool']:44} {r['images_per_s']:8.1f} {r['vs_baseline']:7.2f}x "
              f"{str(r['peak_rss_mb'] or '-'):>8}")
    scale = {m: round(next(r["images_per_s"] for r in rows if r["mode"] == m and r["tool"].endswith("2"))
                      / next(r["images_per_s"] for r in rows if r["mode"] == m and r["tool"].endswith("1")), 2)
             for m in dict.fromkeys(r["mode"] for r in rows)}
    print(f"2 workers vs 1: {scale}")
    print(f"peak memory, --max-size 512 --workers 2: {rows[-1]['peak_rss_mb']} MB at {len(paths)} inputs, "
          f"{mem2['peak_rss_mb']} MB at {2 * len(paths)} inputs")
    print(json.dumps({"rows": rows, "scaling_2_vs_1": scale, "peak_rss_mb_2x_inputs": mem2["peak_rss_mb"],
                      "inputs": len(paths), "load_avg": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
