"""One view's operations on the CPU, kernel by kernel: DALI's CPU operators beside OpenCV's and PIL's.

    python bench/cpu_ops.py --images /tmp/wp/jpg [--rounds 3]

What a 224-px view costs in each library, single-threaded, on the same decoded photos: the crop + resize
(bilinear with antialiasing where the library has it), the affine colour map, the blur (two 1-D passes of a
7-tap kernel), the flip + normalise, and the decode. DALI runs each operator alone in a pipeline over
batches of 32 fed by external_source (the pipeline's own overhead, measured with an identity graph, is
subtracted); OpenCV and PIL run in a loop. CPU ms per image, median of --rounds. This is where the DALI
CPU loader's time goes (bench/loader.py --profile gives the graph's total): its kernels, not its feed.
The last line is JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH, SIZE = 32, 224
CROP = (10, 20, 290, 380)  # top, left, h, w: about the average window on a ~500x375 photo (area 0.6)


def dali_ms(body, images: list[np.ndarray], iterations: int) -> float:
    """CPU ms per image of a one-operator DALI pipeline (1 thread) over `images` (HWC, or encoded bytes)."""
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=BATCH, num_threads=1, device_id=None, exec_dynamic=True, prefetch_queue_depth=1)
    def graph():
        layout = "HWC" if images[0].ndim == 3 else None
        return body(fn.external_source(source=lambda: images, batch=True, layout=layout))

    pipe = graph()
    pipe.build()
    for _ in range(3):
        pipe.run()
    cpu = time.process_time()
    for _ in range(iterations):
        pipe.run()
    return (time.process_time() - cpu) / iterations / BATCH * 1000


def loop_ms(fn_one, items: list, iterations: int) -> float:
    for x in items[:4]:
        fn_one(x)
    cpu = time.process_time()
    for _ in range(iterations):
        for x in items:
            fn_one(x)
    return (time.process_time() - cpu) / iterations / len(items) * 1000


def one_round(raw: list[bytes], iterations: int) -> dict[str, dict[str, float]]:
    import cv2
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    import torchvision.transforms.functional as TF
    from PIL import Image, ImageFilter

    from mocostream.pipeline.augment_reference import MEAN, STD

    cv2.setNumThreads(1)
    top, left, h, w = CROP
    decoded = [cv2.imdecode(np.frombuffer(r, np.uint8), cv2.IMREAD_COLOR_RGB) for r in raw]
    full = [d for d in decoded if d.shape[0] >= top + h and d.shape[1] >= left + w][:BATCH]
    full = (full * BATCH)[:BATCH]
    views = [cv2.resize(d[top:top + h, left:left + w], (SIZE, SIZE)) for d in full]
    encoded = [np.frombuffer(r, np.uint8) for r in raw[:BATCH]]
    m = np.array([[1.1, 0.1, -0.05], [0.05, 0.95, 0.05], [-0.05, 0.1, 1.0]], np.float32)
    t = np.array([3.0, -2.0, 1.0], np.float32)
    kernel = np.array([[0.03, 0.11, 0.22, 0.28, 0.22, 0.11, 0.03]], np.float32)
    mean, std = [255 * v for v in MEAN], [255 * v for v in STD]

    def jitter(img):
        img = TF.adjust_brightness(img, 1.1)
        img = TF.adjust_contrast(img, 0.9)
        img = TF.adjust_saturation(img, 1.2)
        return TF.adjust_hue(img, 0.05)
    base = dali_ms(lambda x: x, views, iterations)  # the pipeline's own cost per image

    def dali(body, images=views):
        return max(0.0, dali_ms(body, images, iterations) - base)

    rows = {
        "decode (JPEG)": {
            "dali": dali(lambda x: fn.decoders.image(x, device="cpu", output_type=types.RGB), encoded),
            "opencv": loop_ms(lambda r: cv2.imdecode(np.frombuffer(r, np.uint8), cv2.IMREAD_COLOR_RGB),
                              raw[:BATCH], iterations),
            "pil": loop_ms(lambda r: Image.open(io.BytesIO(r)).convert("RGB"), raw[:BATCH], iterations)},
        "crop + resize to 224, antialiased": {
            "dali": dali(lambda x: fn.resize(x, size=[SIZE, SIZE], roi_start=[top, left],
                                             roi_end=[top + h, left + w], antialias=True), full),
            "opencv (INTER_AREA)": loop_ms(lambda d: cv2.resize(d[top:top + h, left:left + w], (SIZE, SIZE),
                                                                interpolation=cv2.INTER_AREA), full, iterations),
            "pil (bilinear, the reference's)": loop_ms(
                lambda d: d.resize((SIZE, SIZE), Image.BILINEAR, box=(left, top, left + w, top + h)),
                [Image.fromarray(d) for d in full], iterations)},
        "colour: affine 3x3 + offset, to uint8": {
            "dali": dali(lambda x: fn.cast(fn.coord_transform(x, M=m.ravel().tolist(), T=t.tolist(),
                                                              dtype=types.FLOAT), dtype=types.UINT8)),
            "opencv": loop_ms(lambda v: cv2.transform(v, np.hstack([m, t[:, None]])), views, iterations),
            "pil (torchvision's four jitter ops, the reference's)": loop_ms(
                jitter, [Image.fromarray(v) for v in views], iterations)},
        "blur: 7-tap kernel, both directions": {
            "dali": dali(lambda x: fn.filter(fn.filter(x, kernel, border="clamp"),
                                             np.ascontiguousarray(kernel.T), border="clamp")),
            "opencv": loop_ms(lambda v: cv2.sepFilter2D(v, -1, kernel, kernel.T, borderType=cv2.BORDER_REPLICATE),
                              views, iterations),
            "pil (GaussianBlur(1.0), the reference's)": loop_ms(
                lambda v: v.filter(ImageFilter.GaussianBlur(1.0)), [Image.fromarray(v) for v in views],
                iterations)},
        "flip + normalise to float CHW": {
            "dali": dali(lambda x: fn.crop_mirror_normalize(x, mirror=1, dtype=types.FLOAT, output_layout="CHW",
                                                            mean=mean, std=std)),
            "numpy": loop_ms(lambda v: ((v[:, ::-1].astype(np.float32) - mean) / std).transpose(2, 0, 1).copy(),
                             views, iterations)},
    }
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="a folder of JPEGs (webphotos jpg/)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iterations", type=int, default=20, help="batches (DALI) or passes (loops) per round")
    args = p.parse_args()
    raw = [f.read_bytes() for f in sorted(Path(args.images).glob("*.jpg"))[:BATCH * 2]]
    if len(raw) < BATCH:
        sys.exit(f"error: {args.images} holds fewer than {BATCH} JPEGs")
    rounds = [one_round(raw, args.iterations) for _ in range(args.rounds)]
    median = {op: {lib: round(statistics.median(r[op][lib] for r in rounds), 3) for lib in libs}
              for op, libs in rounds[0].items()}
    print("| operation | " + " | ".join(["library", "CPU ms per image"]) + " |\n| --- | --- | ---: |")
    for op, libs in median.items():
        for lib, ms in libs.items():
            print(f"| {op} | {lib} | {ms:.3f} |")
    print(json.dumps({"rounds": rounds, "median": median, "batch": BATCH, "crop": CROP}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
