"""MoCo two-view augmentation with DALI: the training backend.

One pipeline run = one batch: encoded bytes (already passed by image_check.check_image) are decoded once
(`device="gpu"`: fn.decoders.image(device="mixed"), i.e. nvJPEG / the hardware JPEG decoder, everything
after it on the GPU; `device="cpu"`: the CPU decoder and CPU ops) and augmented twice, independently, into
q and k: float32 (B, 3, S, S), ImageNet-normalised; the opaque int64 sample ids pass through untouched.

Per view, for recipe moco_v2 (aug+) [moco_v1]:

    random resized crop   area U[0.2, 1], aspect log-U[3/4, 4/3] (torchvision's get_params, in python), bilinear + antialias
    colour, p 0.8 [1]     brightness, contrast, saturation factors U[0.6, 1.4], hue U[-0.1, 0.1] [0.4] turns
    grayscale, p 0.2
    gaussian blur, p 0.5  sigma U[0.1, 2.0] x S / 224 (see blur_sigma_range)                [none]
    flip, p 0.5; normalise; HWC -> CHW           (crop_mirror_normalize)

moco_v3 (BYOL's asymmetric recipe): area U[0.08, 1], saturation U[0.8, 1.2], blur p 1.0 in q and 0.1 in k,
and in k solarize p 0.2 (PIL's ImageOps.solarize, a 256-entry fn.lookup_table), after the blur.

How it maps onto DALI, and where it differs from torchvision (augment_reference.py is the reference recipe):

* Random parameters. All per-sample decisions and factors, the crop window included (torchvision's
  get_params on the image size read from its header, vectorised over the batch, then fn.resize with that
  ROI), are drawn by
  `AugParams`, a numpy Generator, and enter the graph through the same external_source as the images.
  The loader reseeds it per batch from the batch's position in the data stream, so a sample's views do
  not depend on num_threads, prefetching or restarts: a resumed run sees the augmentations an
  uninterrupted one would.
* Colour jitter + grayscale are ONE affine colour op per sample, fn.coord_transform (out = M x + T,
  then rounded and clamped to uint8), applied only to samples that jitter or go gray (`if` with
  enable_conditionals; the other 16 % (v2) skip it). See `aug_params.colour_matrix`:
    - brightness, contrast, saturation and grayscale are torchvision's (PIL's) operations exactly:
      scale; blend with the mean luma of the crop; blend with the luma image; luma (PIL "L" weights).
      fn.color_twist / fn.brightness_contrast would pivot contrast on 128 instead of the image mean,
      shifting dark or bright images by up to 0.4 * |mean - 128| levels.
    - hue: torchvision's factor h is a fraction of a turn (|h| <= 0.5); DALI's colour ops take degrees,
      so it is h * 360 (not the * 180 found in some DALI SSL code). torchvision shifts H in HSV, which is
      not a linear map. We rotate RGB about the gray axis by h * 360 degrees, the closest linear map
      (same angle, measured on a circle instead of HSV's hexagon). DALI's own hue (fn.hsv,
      fn.color_twist) rotates in YIQ, which on real photos is further from torchvision: mean absolute
      error against adjust_hue, 20 webphotos, h = 0.1: YIQ 14.3 levels, gray-axis 8.4, no hue change
      at all 14.5; at h = 0.4: 20.4 vs 7.4 (vs 57.9).
    - order: torchvision applies the four jitter ops in a random order, rounding and clamping to
      [0, 255] after each. Without the clamps every order gives the same affine map except for the
      small hue/saturation interaction (brightness and contrast commute with everything, contrast
      pivots on the current mean), so what differs is that we clamp once, at the end: a highlight pushed
      past 255 by brightness and pulled back by contrast keeps its detail here but not in torchvision.
      Grayscale before (v1) or after (v2) the jitter gives the same map (chroma scaled to 0).
* Gaussian blur: two 1-D fn.filter passes (edge pixels repeated, as PIL does) with a per-sample kernel
  that is exactly PIL's GaussianBlur(radius=sigma) (3 box blurs; see `aug_params.gaussian_kernel`), 3-13 taps.
  fn.gaussian_blur samples a true Gaussian, which for small sigma is far weaker than PIL's blur, and in
  DALI 2.4 on CPU is ~4x slower than fn.filter (fixed large windows slower still).
* Flip: crop_mirror_normalize(mirror=...), fused with normalisation and the layout change.

Speed on CPU: DALI's CPU operators, not the feed, bound this graph there (bench/cpu_ops.py, one thread,
CPU ms per view of a ~500x375 photo): resize 2.2 (PIL's antialiased bilinear: 0.8), colour map 1.3 (OpenCV:
0.03), blur 0.2, normalise 0.2; decode 0.9 per image. The whole graph runs at ~1.5x the reference recipe's
images/s on 2 cores (bench/loader.py); the opencv backend's workers (augment_cv.py), same views,
~2.3-2.7x. On a GPU the same graph runs on the GPU and the CPU pays only the feed.

Decode only what the views need: both crop windows are drawn before decoding (in the feed, from the
size in the JPEG header), and fn.decoders.image_slice decodes just their union (libjpeg-turbo and nvJPEG
skip the IDCT outside the region and stop after its last row); the views crop inside that region. The
views are those of a full decode (tests/test_reduced_decode.py). Measured per 1024x768 JPEG on one core:
full decode 2.5 ms, a region of half the width and height 1.8 ms.
The feed (header sizes, crop windows for the whole batch at once, cached blur kernels, batch-shaped
parameter arrays) costs ~0.04 CPU-ms per image: bench/loader.py --feed-only.

Use `pipe = build_two_view_pipeline(...)`, `pipe.build()`, then `dali_outputs_to_torch(pipe.run(), device)`
per batch. Do not also wrap the same pipeline in a DALI iterator ("Mixing pipeline API type" error).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import nvidia.dali.fn as fn
import torch
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.backend import TensorGPU

from mocostream.pipeline.aug_params import LUMA, SOLARIZE_LUT, AugParams, image_size
from mocostream.pipeline.augment_reference import MEAN, STD
from mocostream.pipeline.vocabulary import RECIPES

FEED_OUTPUTS = 4 + 2 * AugParams.OUTPUTS_PER_VIEW  # encoded, ids, region start, region end, q's, k's


def _gray_mean(img):
    """Mean luma of each sample as a CPU scalar (a GPU reduction is moved to the CPU, since per-sample
    operator arguments must live on the CPU)."""
    m = fn.reductions.mean(img, axes=[0, 1]).cpu()
    return m[0] * float(LUMA[0]) + m[1] * float(LUMA[1]) + m[2] * float(LUMA[2])


def _colour(img, m, k):
    """out = M x + k * mean_luma(x), rounded and clamped to uint8 (see colour_matrix)."""
    # float out + a saturating cast is ~0.4 ms/view cheaper on CPU than coord_transform's own uint8 output
    out = fn.coord_transform(img, M=m, T=k * _gray_mean(img), dtype=types.FLOAT)
    return fn.cast(out, dtype=types.UINT8)


def _blur(img, kernel_h, kernel_v):
    """Separable blur with per-sample (1, n) and (n, 1) kernels, edges repeated (PIL's border rule)."""
    img = fn.filter(img, kernel_h, border="clamp")
    return fn.filter(img, kernel_v, border="clamp")


def _solarize(img):
    """PIL's ImageOps.solarize: levels from 128 up inverted, one table lookup per pixel."""
    return fn.lookup_table(img, keys=list(range(256)), values=SOLARIZE_LUT.tolist(), dtype=types.UINT8)


def _view(images, params: Sequence, size: int):
    roi_start, roi_end, colour_on, m, k, blur_on, kh, kv, solarize, mirror = params
    # The crop window comes from crop_windows (torchvision's algorithm), so it is reproducible too.
    img = fn.resize(images, size=[size, size], roi_start=roi_start, roi_end=roi_end, antialias=True)
    if colour_on:  # conditional: samples that neither jitter nor go gray skip the op entirely
        img = _colour(img, m, k)
    if blur_on:
        img = _blur(img, kh, kv)
    if solarize:
        img = _solarize(img)
    return fn.crop_mirror_normalize(
        img, mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
        mean=[255.0 * v for v in MEAN], std=[255.0 * v for v in STD],
    )


@pipeline_def(enable_conditionals=True)
def _two_view_graph(feed, size: int, decoder_device: str):
    n = AugParams.OUTPUTS_PER_VIEW
    encoded, ids, start, end, *p = fn.external_source(source=feed, num_outputs=FEED_OUTPUTS, batch=True)
    # Only the region the two crop windows cover is decoded (JPEG: libjpeg-turbo / nvJPEG ROI decoding).
    images = fn.decoders.image_slice(encoded, start=start, end=end, axis_names="HW", device=decoder_device,
                                     output_type=types.RGB)
    q = _view(images, p[:n], size)
    k = _view(images, p[n:], size)
    return q, k, ids


def build_two_view_pipeline(source: Callable[[], tuple[list[np.ndarray], list[np.ndarray]]], *,
                            batch_size: int, size: int, recipe: str, device: str, num_threads: int,
                            seed: int, device_id: int | None = None, prefetch_queue_depth: int = 2):
    """A DALI pipeline producing (q, k, ids) per run; call .build() then .run().

    source: called once per batch with no arguments; returns (encoded, ids) or (encoded, ids, batch_seed):
    exactly batch_size 1-D np.uint8 arrays of validated file bytes, as many np.int64 0-d or (1,)-shaped
    sample ids, and optionally an int seeding this batch's augmentation (else one stream from `seed`).
    device: "cpu" (CPU decode and ops, no GPU needed) or "gpu" (mixed decode, ops on GPU `device_id`,
    default the current CUDA device). seed: make it distinct per rank/worker.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {recipe!r}; expected one of {RECIPES}")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if batch_size < 1 or size < 1 or num_threads < 1:
        raise ValueError("batch_size, size and num_threads must be positive")
    if device == "cpu":
        device_id = None
    elif device_id is None:
        device_id = torch.cuda.current_device()
    params = AugParams(recipe, batch_size, seed, size)

    def feed():
        out = source()
        encoded, ids = out[0], out[1]
        if len(out) > 2:  # a batch seed from the caller: augmentation keyed to the data, not to time
            params.reseed(out[2])
        return (encoded, ids, *params([image_size(e) for e in encoded]))

    return _two_view_graph(
        feed, size, "mixed" if device == "gpu" else "cpu",
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
        prefetch_queue_depth=prefetch_queue_depth,
        exec_dynamic=True,  # needed for the GPU -> CPU move in _gray_mean and the zero-copy outputs
    )


def _to_torch(tl, on_gpu: bool) -> torch.Tensor:
    """Zero-copy via DLPack, as DALIGenericIterator does for the dynamic executor (which our pipelines
    use): each run's outputs are freshly allocated and stay alive while the torch tensor references them.
    For GPU data, torch.from_dlpack passes PyTorch's current stream, so DALI's work is ordered before
    any use of the tensor on that stream."""
    t = tl.as_tensor()
    if isinstance(t, TensorGPU):
        with torch.device("cuda", t.device_id()):
            out = torch.from_dlpack(t)
        return out if on_gpu else out.cpu()
    out = torch.from_dlpack(t)
    return out.cuda(non_blocking=True) if on_gpu else out


def dali_outputs_to_torch(outputs, device: str):
    """pipe.run() outputs -> (q, k, ids) torch tensors.

    q, k: float32 (B, 3, S, S) on the CPU (device "cpu") or the current CUDA device (device "gpu");
    ids: int64 (B,) always on the CPU (they map back to sample keys on the host).
    The tensors share memory with DALI's outputs (no copy); they remain valid after later runs.
    """
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    q, k, ids = outputs
    on_gpu = device == "gpu"
    ids_t = _to_torch(ids, on_gpu=False).reshape(-1).to(torch.int64)
    return _to_torch(q, on_gpu), _to_torch(k, on_gpu), ids_t
