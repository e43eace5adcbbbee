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

How it maps onto DALI, and where it differs from torchvision (augment_torch.py is the reference):

* Random parameters. All per-sample decisions and factors, the crop window included (torchvision's
  get_params on the image size read from its header, vectorised over the batch, then fn.resize with that
  ROI), are drawn by
  `_AugParams`, a numpy Generator, and enter the graph through the same external_source as the images.
  The loader reseeds it per batch from the batch's position in the data stream, so a sample's views do
  not depend on num_threads, prefetching or restarts: a resumed run sees the augmentations an
  uninterrupted one would.
* Colour jitter + grayscale are ONE affine colour op per sample, fn.coord_transform (out = M x + T,
  then rounded and clamped to uint8), applied only to samples that jitter or go gray (`if` with
  enable_conditionals; the other 16 % (v2) skip it). See `colour_matrix`:
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
  that is exactly PIL's GaussianBlur(radius=sigma) (3 box blurs; see `gaussian_kernel`), 3-13 taps.
  fn.gaussian_blur samples a true Gaussian, which for small sigma is far weaker than PIL's blur, and in
  DALI 2.4 on CPU is ~4x slower than fn.filter (fixed large windows slower still).
* Flip: crop_mirror_normalize(mirror=...), fused with normalisation and the layout change.

Speed on CPU (bench/augment.py, v2, 224 px from ~500x375 JPEGs, 2 cores): ~9.5 CPU-ms per image, 2x the
reference PIL recipe (18.6). Per view: crop ~0.7 ms, colour ~1.6 ms (84 % of views), blur ~0.7 ms
(50 %), normalise ~0.25 ms; the decode, shared by both views, ~1.7 ms.

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

import functools
from typing import Callable, NamedTuple, Sequence

import numpy as np
import nvidia.dali.fn as fn
import torch
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.backend import TensorGPU

from pipeline.augment_torch import MEAN, RECIPES, STD, blur_sigma_range

# PIL's "L" / ITU-R 601 luma weights: grayscale, saturation and the contrast pivot use them.
_LUMA = np.array([0.299, 0.587, 0.114])
_GRAY_AXIS = np.ones(3) / np.sqrt(3.0)
_CROSS = np.array([[0.0, -_GRAY_AXIS[2], _GRAY_AXIS[1]],
                   [_GRAY_AXIS[2], 0.0, -_GRAY_AXIS[0]],
                   [-_GRAY_AXIS[1], _GRAY_AXIS[0], 0.0]])


class _Recipe(NamedTuple):
    jitter_p: float
    hue: float          # max |hue factor|, in turns (torchvision's units)
    gray_p: float
    blur_p: float


_RECIPES = {
    # moco_v1: RandomGrayscale(0.2) then ColorJitter(0.4, 0.4, 0.4, 0.4) always; no blur.
    "moco_v1": _Recipe(jitter_p=1.0, hue=0.4, gray_p=0.2, blur_p=0.0),
    # moco_v2: RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), 0.8), RandomGrayscale(0.2), blur p 0.5.
    "moco_v2": _Recipe(jitter_p=0.8, hue=0.1, gray_p=0.2, blur_p=0.5),
}
_JITTER = 0.4            # brightness = contrast = saturation = 0.4: factors U[0.6, 1.4]
# GaussianBlur sigma: blur_sigma_range(S), the reference's U[0.1, 2.0] at 224 px scaled to S
_AREA = (0.2, 1.0)       # RandomResizedCrop scale
_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def colour_matrix(brightness, contrast, saturation, hue_turns) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample affine colour map for N samples: M (N, 3, 3) float32 and the contrast pivot weight k (N,),
    such that out = M @ x + k * mean_luma(x) for RGB pixels x in [0, 255].

    M = b * c * Hue(h) @ Sat(s) and k = (1 - c) * b:
      brightness  x -> b x                        (torchvision: blend with black)
      contrast    x -> c x + (1 - c) mean_luma    (torchvision: blend with the mean of the "L" image)
      saturation  x -> s x + (1 - s) luma(x)      (torchvision: blend with the "L" image)
      hue         rotation about the gray axis by h turns
    The first three are torchvision's operations exactly (up to its per-op clamping); hue is an
    approximation, see the module docstring.
    """
    b, c, s = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (brightness, contrast, saturation))
    theta = 2.0 * np.pi * np.asarray(hue_turns, dtype=np.float64).reshape(-1)
    eye = np.eye(3)
    gray = np.outer(np.ones(3), _LUMA)                      # x -> luma(x) in every channel
    sat = s[:, None, None] * eye + (1.0 - s)[:, None, None] * gray
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    # Rodrigues: rotation by theta about the unit gray axis; +theta turns red towards yellow, as
    # torchvision's adjust_hue(+h) does.
    hue = cos * eye + sin * _CROSS + (1.0 - cos) * np.outer(_GRAY_AXIS, _GRAY_AXIS)
    m = (b * c)[:, None, None] * (hue @ sat)
    k = (1.0 - c) * b
    return m.astype(np.float32), k.astype(np.float32)


def gaussian_kernel(sigma: float, passes: int = 3) -> np.ndarray:
    """The 1-D kernel of PIL's ImageFilter.GaussianBlur(radius=sigma), normalised, float32.

    PIL (BoxBlur.c) runs `passes` box blurs whose fractional radius l + a is chosen so that their total
    variance is sigma^2 (Gwosdek et al., SSVM 2011): weights 1 inside radius l, a at l + 1. Their
    convolution is the exact equivalent kernel. A sampled Gaussian exp(-x^2 / 2 sigma^2) would be much
    weaker than PIL's blur for sigma < ~0.6 (a quarter of the moco_v2 sigma range): at sigma 0.3 its
    variance is 0.008 instead of 0.09. Tails below 1e-4 (< 0.05 grey levels) are trimmed.
    """
    sigma2 = sigma * sigma / passes
    length = np.sqrt(12.0 * sigma2 + 1.0)
    l = np.floor((length - 1.0) / 2.0)
    a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2) / (6 * (sigma2 - (l + 1) ** 2))
    box = np.ones(2 * int(l) + 3)
    box[0] = box[-1] = a
    box /= box.sum()
    w = box
    for _ in range(passes - 1):
        w = np.convolve(w, box)
    r = len(w) // 2
    while r > 1 and w[0] < 1e-4:  # symmetric trim
        w, r = w[1:-1], r - 1
    return (w / w.sum()).astype(np.float32)


def crop_windows(rng: np.random.Generator, width: np.ndarray, height: np.ndarray) -> tuple[np.ndarray, ...]:
    """torchvision's RandomResizedCrop.get_params (scale 0.2-1, ratio 3/4-4/3) for a whole batch at once (a
    per-image Python loop cost ~40 us/image): (top, left, h, w) arrays.

    The same algorithm: up to 10 tries of area U[0.2, 1] x image area and aspect log-U[3/4, 4/3], the first
    that fits wins, its position uniform; else the central crop of the nearest allowed aspect ratio.
    """
    n = len(width)
    width, height = width.astype(np.float64), height.astype(np.float64)
    target = (width * height)[:, None] * rng.uniform(*_AREA, (n, 10))
    aspect = np.exp(rng.uniform(np.log(_RATIO[0]), np.log(_RATIO[1]), (n, 10)))
    w = np.round(np.sqrt(target * aspect))  # round half to even, like Python's round()
    h = np.round(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.argmax(axis=1)
    rows = np.arange(n)
    w, h, found = w[rows, first], h[rows, first], fits[rows, first]
    top = np.floor(rng.random(n) * (height - h + 1))
    left = np.floor(rng.random(n) * (width - w + 1))
    if not found.all():  # fallback: the central crop of the nearest allowed aspect ratio
        ratio = width / height
        fw = np.where(ratio < _RATIO[0], width, np.where(ratio > _RATIO[1], np.round(height * _RATIO[1]), width))
        fh = np.where(ratio < _RATIO[0], np.round(width / _RATIO[0]), height)
        w, h = np.where(found, w, fw), np.where(found, h, fh)
        top = np.where(found, top, (height - fh) // 2)
        left = np.where(found, left, (width - fw) // 2)
    return top.astype(np.int64), left.astype(np.int64), h.astype(np.int64), w.astype(np.int64)


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT, JPG, DAC)


def _exif_orientation(b: bytes, start: int, end: int) -> int:
    """The orientation tag (0x0112) of IFD0 of the TIFF structure in b[start:end] (an APP1 Exif body); 1 if none."""
    order = "little" if b[start:start + 2] == b"II" else "big"
    ifd = start + int.from_bytes(b[start + 4:start + 8], order)
    if ifd + 2 > end:
        return 1
    for e in range(ifd + 2, min(end - 11, ifd + 2 + 12 * int.from_bytes(b[ifd:ifd + 2], order)), 12):
        if int.from_bytes(b[e:e + 2], order) == 0x0112:
            return int.from_bytes(b[e + 8:e + 10], order)
    return 1


def _jpeg_size(b: bytes) -> tuple[int, int] | None:
    """(width, height) as decoded (EXIF rotation applied) from a JPEG's marker segments; None when they do
    not read as a plain JPEG (then PIL decides). ~5 us instead of ~50-200 for PIL's open + getexif."""
    i, n, orientation = 2, len(b), 1
    while i + 9 <= n:
        marker = b[i + 1]
        if b[i] != 0xFF or marker == 0xDA:
            return None
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(b[i + 2:i + 4], "big")
        if marker == 0xE1 and b[i + 4:i + 10] == b"Exif\0\0" and orientation == 1:
            orientation = _exif_orientation(b, i + 10, i + 2 + length)
        elif marker in _SOF:
            h, w = int.from_bytes(b[i + 5:i + 7], "big"), int.from_bytes(b[i + 7:i + 9], "big")
            return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
        i += 2 + length
    return None


def image_size(data: np.ndarray) -> tuple[int, int]:
    """(width, height) of encoded image bytes as the decoder will output them (EXIF rotation applied)."""
    import io

    from PIL import Image

    raw = data.tobytes() if isinstance(data, np.ndarray) else data
    if raw[:2] == b"\xff\xd8":
        size = _jpeg_size(raw)
        if size is not None and size[0] > 0 and size[1] > 0:
            return size
    with Image.open(io.BytesIO(raw)) as img:
        w, h = img.size
        if img.format == "JPEG" and img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            w, h = h, w  # rotated by 90 degrees on decode
    return w, h


@functools.lru_cache(maxsize=4096)
def _kernel_pair(sigma_millipx: int) -> tuple[np.ndarray, np.ndarray]:
    """(horizontal (1, n), vertical (n, 1)) blur kernels for sigma in thousandths of a pixel: sigma drawn
    to 0.001 px (a kernel changes by < 0.001 of its weights) so the kernels of a run are computed once."""
    w = gaussian_kernel(sigma_millipx / 1000.0)[None, :]
    return w, np.ascontiguousarray(w.T)


_NO_BLUR = (np.ones((1, 1), np.float32), np.ones((1, 1), np.float32))


class _AugParams:
    """Per-batch random parameters of both views, from a numpy Generator.

    Called once per batch with the images' sizes (in iteration order). The generator is reseeded per
    batch when the caller gives a batch seed (the loader derives it from the data position), so the
    augmentation of a sample does not depend on threads, prefetching or restarts. Returns the decode
    region (the union of both views' crop windows: start and end (y, x)), then per view: crop window
    start and end (y, x) inside that region, colour_on (bool), M (3x3), k, blur_on (bool), horizontal
    kernel (1, n), vertical kernel (n, 1), mirror (int32). Fixed-shape ones are whole-batch arrays.
    """

    OUTPUTS_PER_VIEW = 9

    def __init__(self, recipe: str, batch_size: int, seed: int, size: int = 224):
        self.r = _RECIPES[recipe]
        self.sigma = blur_sigma_range(size)
        self.n = batch_size
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def draw(self) -> dict[str, np.ndarray]:
        """One view's per-sample decisions and factors, as the recipe specifies them."""
        r, n, rng = self.r, self.n, self.rng
        jitter = rng.random(n) < r.jitter_p
        lo, hi = 1.0 - _JITTER, 1.0 + _JITTER
        f = {
            "jitter": jitter,
            "brightness": np.where(jitter, rng.uniform(lo, hi, n), 1.0),
            "contrast": np.where(jitter, rng.uniform(lo, hi, n), 1.0),
            "saturation": np.where(jitter, rng.uniform(lo, hi, n), 1.0),
            "hue": np.where(jitter, rng.uniform(-r.hue, r.hue, n), 0.0),
            "gray": rng.random(n) < r.gray_p,
            "blur": rng.random(n) < r.blur_p,
            "sigma": rng.uniform(*self.sigma, n),
            "mirror": rng.random(n) < 0.5,
        }
        return f

    def _view(self) -> list:
        f = self.draw()
        saturation = np.where(f["gray"], 0.0, f["saturation"])  # grayscale: chroma scaled to 0
        m, k = colour_matrix(f["brightness"], f["contrast"], saturation, f["hue"])
        kernels = [_kernel_pair(int(round(sg * 1000))) if on else _NO_BLUR for sg, on in zip(f["sigma"], f["blur"])]
        colour_on = f["jitter"] | f["gray"]
        return [colour_on, m, k, f["blur"], [h for h, _ in kernels], [v for _, v in kernels],
                f["mirror"].astype(np.int32)]

    def __call__(self, sizes: Sequence[tuple[int, int]]) -> tuple:
        wh = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        windows = []
        for _ in range(2):  # q's crop and colour, then k's: each view drawn as a whole
            top, left, h, w = crop_windows(self.rng, wh[:, 0], wh[:, 1])
            windows.append((np.stack([top, left], 1), np.stack([top + h, left + w], 1), self._view()))
        start = np.minimum(windows[0][0], windows[1][0])  # the region both views need: decoded, nothing else
        end = np.maximum(windows[0][1], windows[1][1])
        out = [start.astype(np.int32), end.astype(np.int32)]
        for w_start, w_end, view in windows:
            out += [(w_start - start).astype(np.float32), (w_end - start).astype(np.float32), *view]
        return tuple(out)


FEED_OUTPUTS = 4 + 2 * _AugParams.OUTPUTS_PER_VIEW  # encoded, ids, region start, region end, q's, k's


def _gray_mean(img):
    """Mean luma of each sample as a CPU scalar (a GPU reduction is moved to the CPU, since per-sample
    operator arguments must live on the CPU)."""
    m = fn.reductions.mean(img, axes=[0, 1]).cpu()
    return m[0] * float(_LUMA[0]) + m[1] * float(_LUMA[1]) + m[2] * float(_LUMA[2])


def _colour(img, m, k):
    """out = M x + k * mean_luma(x), rounded and clamped to uint8 (see colour_matrix)."""
    # float out + a saturating cast is ~0.4 ms/view cheaper on CPU than coord_transform's own uint8 output
    out = fn.coord_transform(img, M=m, T=k * _gray_mean(img), dtype=types.FLOAT)
    return fn.cast(out, dtype=types.UINT8)


def _blur(img, kernel_h, kernel_v):
    """Separable blur with per-sample (1, n) and (n, 1) kernels, edges repeated (PIL's border rule)."""
    img = fn.filter(img, kernel_h, border="clamp")
    return fn.filter(img, kernel_v, border="clamp")


def _view(images, params: Sequence, size: int):
    roi_start, roi_end, colour_on, m, k, blur_on, kh, kv, mirror = params
    # The crop window comes from crop_windows (torchvision's algorithm), so it is reproducible too.
    img = fn.resize(images, size=[size, size], roi_start=roi_start, roi_end=roi_end, antialias=True)
    if colour_on:  # conditional: samples that neither jitter nor go gray skip the op entirely
        img = _colour(img, m, k)
    if blur_on:
        img = _blur(img, kh, kv)
    return fn.crop_mirror_normalize(
        img, mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
        mean=[255.0 * v for v in MEAN], std=[255.0 * v for v in STD],
    )


@pipeline_def(enable_conditionals=True)
def _two_view_graph(feed, size: int, decoder_device: str):
    n = _AugParams.OUTPUTS_PER_VIEW
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
    if recipe not in _RECIPES:
        raise ValueError(f"unknown augmentation recipe {recipe!r}; expected one of {RECIPES}")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if batch_size < 1 or size < 1 or num_threads < 1:
        raise ValueError("batch_size, size and num_threads must be positive")
    if device == "cpu":
        device_id = None
    elif device_id is None:
        device_id = torch.cuda.current_device()
    params = _AugParams(recipe, batch_size, seed, size)

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
