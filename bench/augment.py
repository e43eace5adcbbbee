"""Two-view augmentation throughput: reference recipe vs the opencv backend vs DALI CPU pipeline.

    python bench/augment.py --images DIR [--seconds 20] [--recipe moco_v2] [--size 224]

DIR: a folder of JPEGs (the webphotos jpg/ set: 500 photos, ~500x375). Every backend produces two
normalised float views per image, from the encoded bytes in memory (no disk I/O timed), on the same number
of cores (`--workers`, default all):

  (a) reference  PIL decode + the unmodified main_moco.py transform, twice; one process per core
  (b) opencv     augment_cv.augment_images (the opencv backend's workers, uint8) + batched normalize; per core
  (c) dali_cpu   augment_dali pipeline, device="cpu", num_threads = cores, one process

plus the cost of image_check.check_image (one core), which runs before (c) in the real stream.
Prints a table and a final JSON line. images/s depends on what else runs on the machine; CPU ms per
image (process CPU time, all threads, divided by images) is the steadier figure for comparisons.

Measured on the 2-core dev machine while other jobs ran (load ~3), --seconds 20, 224 px, when (b) still ran
PIL + torchvision (BENCHMARKS.md has today's figures, OpenCV workers):

    moco_v2   reference 52.8 img/s (18.6 CPU-ms/img)   (b) 51.7 (19.1)     dali_cpu 105.0 (9.5)  -> 2.0x
              (a busier minute: 44.7 (19.0)             40.1 (19.5)         74.5 (9.2)   -> 1.7x)
    moco_v1   reference 61.3 img/s (16.2)                                  dali_cpu 127.9 (7.7)  -> 2.1x
    check_image 0.78-1.2 ms/image on one core
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mocostream.pipeline.vocabulary import BACKEND_ALIASES, OPENCV, RECIPES  # noqa: E402


def _load(folder: str, limit: int | None = None) -> list[bytes]:
    exts = (".jpg", ".jpeg", ".png", ".webp")
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in exts)[:limit]
    if not paths:
        raise SystemExit(f"error: no images in {folder}")
    return [p.read_bytes() for p in paths]


def _process_worker(kind: str, folder, recipe: str, size: int, seconds: float, batch: int, out) -> None:
    import io

    import torch
    from PIL import Image

    from mocostream.pipeline.augment_cv import augment_images
    from mocostream.pipeline.augment_reference import normalize, reference_transform

    torch.set_num_threads(1)
    data = _load(folder) if isinstance(folder, str) else folder  # a folder, or the encoded images themselves
    if kind == "reference":
        t = reference_transform(recipe, size)

        def one_batch(items):
            for raw in items:
                img = Image.open(io.BytesIO(raw)).convert("RGB")  # main_moco.py's pil_loader
                t(img), t(img)
    else:
        def one_batch(items):
            q, k, _ = augment_images(items, recipe, size, seed=len(items))
            normalize(q), normalize(k)

    one_batch(data[:4])  # warm-up
    n, i, start, cpu = 0, 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        items = [data[(i + j) % len(data)] for j in range(batch)]
        i += batch
        one_batch(items)
        n += len(items)
    out.put((n, time.perf_counter() - start, time.process_time() - cpu))


def bench_processes(kind: str, args) -> tuple[float, float]:
    """(images/s over all workers, CPU ms per image) of the reference recipe or the opencv backend's workers,
    one process per worker."""
    ctx = mp.get_context("spawn")  # no fork after DALI/torch threads exist
    q = ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(kind, args.images, args.recipe, args.size,
                                                     args.seconds, 16, q)) for _ in range(args.workers)]
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    images = sum(n for n, _, _ in results)
    return sum(n / dt for n, dt, _ in results), sum(c for _, _, c in results) / images * 1e3


def bench_dali(args) -> tuple[float, float]:
    """(images/s, CPU ms per image: all DALI threads and the Python thread)."""
    import numpy as np

    from mocostream.pipeline.augment_dali import build_two_view_pipeline, dali_outputs_to_torch

    data = [np.frombuffer(raw, np.uint8) for raw in _load(args.images)]
    b = args.batch_size
    state = {"i": 0}

    def source():
        i = state["i"]
        state["i"] = i + b
        return ([data[(i + j) % len(data)] for j in range(b)],
                [np.array(i + j, dtype=np.int64) for j in range(b)])

    pipe = build_two_view_pipeline(source, batch_size=b, size=args.size, recipe=args.recipe, device="cpu",
                                   num_threads=args.workers, seed=0)
    pipe.build()
    for _ in range(2):  # warm-up (and fill the prefetch queue)
        dali_outputs_to_torch(pipe.run(), "cpu")
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < args.seconds:
        q, k, ids = dali_outputs_to_torch(pipe.run(), "cpu")
        n += len(ids)
    return n / (time.perf_counter() - start), (time.process_time() - cpu) / n * 1e3


def bench_check(args) -> float:
    from mocostream.pipeline.image_check import check_image

    data = _load(args.images)
    start = time.perf_counter()
    bad = sum(check_image(raw) is not None for raw in data)
    ms = (time.perf_counter() - start) / len(data) * 1e3
    if bad:
        print(f"note: check_image rejected {bad} of {len(data)} files", file=sys.stderr)
    return ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", required=True, help="folder of JPEG files (webphotos jpg/)")
    ap.add_argument("--seconds", type=float, default=20.0, help="timed seconds per backend")
    ap.add_argument("--recipe", default="moco_v2", choices=RECIPES)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64, help="DALI batch size")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="processes for (a)/(b), DALI threads for (c); default: all cores")
    ap.add_argument("--only", default=f"reference,{OPENCV},dali_cpu", help="comma-separated subset")
    args = ap.parse_args(argv)
    if not Path(args.images).is_dir():
        print(f"error: --images {args.images} is not a folder", file=sys.stderr)
        return 2

    only = {BACKEND_ALIASES.get(name, name) for name in args.only.split(",")}
    res: dict[str, tuple[float, float]] = {}
    if "reference" in only:
        res["reference"] = bench_processes("reference", args)
    if OPENCV in only:
        res[OPENCV] = bench_processes(OPENCV, args)
    if "dali_cpu" in only:
        res["dali_cpu"] = bench_dali(args)
    check_ms = bench_check(args)

    print(f"{args.recipe}, {args.size} px, two views/image, {args.workers} cores, {args.seconds:g} s each")
    print(f"{'backend':<12}{'images/s':>10}{'vs reference':>14}{'CPU ms/image':>14}")
    for name, (v, cpu_ms) in res.items():
        rel = f"{v / res['reference'][0]:.2f}x" if "reference" in res else "-"
        print(f"{name:<12}{v:>10.1f}{rel:>14}{cpu_ms:>14.2f}")
    print(f"check_image: {check_ms:.2f} ms/image on one core ({1e3 / check_ms:.0f} images/s)")
    print(json.dumps({"recipe": args.recipe, "size": args.size, "cores": args.workers,
                      "seconds": args.seconds, **{f"{k}_img_s": round(v[0], 1) for k, v in res.items()},
                      **{f"{k}_cpu_ms_per_img": round(v[1], 2) for k, v in res.items()},
                      "check_image_ms": round(check_ms, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
