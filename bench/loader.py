"""Loader throughput: two augmented views per image (v2 recipe), the loader alone, no training.

    python bench/loader.py --data SHARDS --backend dali --seconds 30
    python bench/loader.py --images ../webphotos/jpg --backend all --seconds 30   # dali, torch, reference

`--backend all` measures, in one run, the DALI and torch backends of the streaming loader and the
reference MoCo recipe (PIL decode + torchvision transforms with PIL's blur, in a torch DataLoader with the
same number of worker processes) on the same images. The last line is JSON with `images_per_s`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench_loader(data: str, backend: str, seconds: float, batch: int, size: int, workers: int) -> dict:
    from pipeline.loader import LoaderConfig, TwoViewLoader

    loader = TwoViewLoader(LoaderConfig(data=data, batch_size=batch, image_size=size, recipe="moco_v2",
                                        backend=backend, workers=workers, seed=0))
    it = iter(loader)
    next(it)  # warm-up: pipeline build, first shard reads, worker start
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        n += len(b.keys)
    dt = time.perf_counter() - t0
    it.close()
    return {"backend": backend, "images": n, "seconds": round(dt, 2), "images_per_s": round(n / dt, 1),
            "skipped": dict(loader.skipped)}


class _Reference:
    """The reference MoCo v2 data path: PIL decode, torchvision aug+ twice (TwoCropsTransform)."""

    def __init__(self, blobs, size):
        from pipeline.augment_torch import reference_transform

        self.blobs, self.transform = blobs, reference_transform("moco_v2", size)

    def __len__(self):
        return len(self.blobs) * 1000

    def __getitem__(self, i):
        import io

        from PIL import Image

        img = Image.open(io.BytesIO(self.blobs[i % len(self.blobs)])).convert("RGB")
        return self.transform(img), self.transform(img)


def bench_reference(data: str, seconds: float, batch: int, size: int, workers: int) -> dict:
    import torch

    from pipeline.readers import read_samples
    from pipeline.sources import read_bytes, resolve_shards

    blobs = [s.data for sh in resolve_shards(data) for s in read_samples(sh, read_bytes(sh.url)) if not s.error]
    dl = torch.utils.data.DataLoader(_Reference(blobs, size), batch_size=batch, shuffle=True,
                                     num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    it = iter(dl)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        q, k = next(it)
        n += q.shape[0]
    dt = time.perf_counter() - t0
    return {"backend": "reference", "images": n, "seconds": round(dt, 2), "images_per_s": round(n / dt, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="shards (manifest, folder, pattern or s3:// prefix)")
    src.add_argument("--images", help="a folder of images, made into tar shards first")
    p.add_argument("--backend", default="dali", choices=["dali", "torch", "reference", "all"])
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (torch, reference) or threads (dali)")
    args = p.parse_args()

    data = args.data
    if args.images:
        from shards.create import create_shards

        data = tempfile.mkdtemp(prefix="bench-shards-")
        create_shards([args.images], data, fmt="tar", samples_per_shard=100, progress=False)
    backends = ["dali", "torch", "reference"] if args.backend == "all" else [args.backend]
    results = []
    for backend in backends:
        if backend == "reference":
            r = bench_reference(data, args.seconds, args.batch_size, args.image_size, args.workers)
        else:
            r = bench_loader(data, backend, args.seconds, args.batch_size, args.image_size, args.workers)
        results.append(r)
        print(f"{backend:>10}: {r['images_per_s']:8.1f} images/s ({r['images']} in {r['seconds']} s)", flush=True)
    base = next((r["images_per_s"] for r in results if r["backend"] == "reference"), None)
    if base:
        for r in results:
            r["vs_reference"] = round(r["images_per_s"] / base, 2)
    final = results[0] if len(results) == 1 else {"images_per_s": results[0]["images_per_s"], "results": results}
    final.update({"cores": os.cpu_count(), "workers": args.workers, "image_size": args.image_size,
                  "batch_size": args.batch_size, "recipe": "moco_v2"})
    print(json.dumps(final))


if __name__ == "__main__":
    main()
