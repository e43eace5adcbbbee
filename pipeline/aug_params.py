"""The MoCo recipes' random parameters, drawn in numpy for a whole batch: both backends use them.

Per view: the crop window (torchvision's RandomResizedCrop.get_params, vectorised), whether the view jitters
its colour and goes gray (one affine colour map, `colour_matrix`), whether and how much it blurs (PIL's
GaussianBlur as a 1-D kernel, `gaussian_kernel`) and whether it is mirrored. The DALI graph
(augment_dali.py) and the OpenCV workers (augment_cv.py) draw them from the same generator in the same
order, so one seed gives both backends the same views up to rounding. How the maths maps onto torchvision's
operations, and where it differs, is in augment_dali.py's module docstring.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import numpy as np

from mocostream.pipeline.augment_reference import blur_sigma_range

# PIL's "L" / ITU-R 601 luma weights: grayscale, saturation and the contrast pivot use them.
LUMA = np.array([0.299, 0.587, 0.114])
_GRAY_AXIS = np.ones(3) / np.sqrt(3.0)
_CROSS = np.array([[0.0, -_GRAY_AXIS[2], _GRAY_AXIS[1]],
                   [_GRAY_AXIS[2], 0.0, -_GRAY_AXIS[0]],
                   [-_GRAY_AXIS[1], _GRAY_AXIS[0], 0.0]])


class _Recipe(NamedTuple):
    jitter_p: float
    hue: float          # max |hue factor|, in turns (torchvision's units)
    gray_p: float
    blur_p: tuple[float, float]        # per view: q (x1), k (x2)
    saturation: float = 0.4            # ColorJitter's saturation: factors U[1 - s, 1 + s]
    area_min: float = 0.2              # RandomResizedCrop scale (area_min, 1)
    solarize_p: tuple[float, float] = (0.0, 0.0)


_RECIPES = {
    # moco_v1: RandomGrayscale(0.2) then ColorJitter(0.4, 0.4, 0.4, 0.4) always; no blur.
    "moco_v1": _Recipe(jitter_p=1.0, hue=0.4, gray_p=0.2, blur_p=(0.0, 0.0)),
    # moco_v2: RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), 0.8), RandomGrayscale(0.2), blur p 0.5.
    "moco_v2": _Recipe(jitter_p=0.8, hue=0.1, gray_p=0.2, blur_p=(0.5, 0.5)),
    # moco_v3 (BYOL's, asymmetric): crop scale 0.08-1, RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), 0.8),
    # RandomGrayscale(0.2), blur p 1.0 / 0.1, solarize p 0 / 0.2.
    "moco_v3": _Recipe(jitter_p=0.8, hue=0.1, gray_p=0.2, blur_p=(1.0, 0.1), saturation=0.2, area_min=0.08,
                       solarize_p=(0.0, 0.2)),
}
_JITTER = 0.4            # brightness = contrast = 0.4 (and saturation but in v3): factors U[0.6, 1.4]
# PIL's ImageOps.solarize (threshold 128): levels from 128 up are inverted
SOLARIZE_LUT = np.array([v if v < 128 else 255 - v for v in range(256)], dtype=np.uint8)
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
    gray = np.outer(np.ones(3), LUMA)                      # x -> luma(x) in every channel
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


def crop_windows(rng: np.random.Generator, width: np.ndarray, height: np.ndarray,
                 area: tuple[float, float] = _AREA) -> tuple[np.ndarray, ...]:
    """torchvision's RandomResizedCrop.get_params (scale `area`, ratio 3/4-4/3) for a whole batch at once (a
    per-image Python loop cost ~40 us/image): (top, left, h, w) arrays.

    The same algorithm: up to 10 tries of area U[area] x image area and aspect log-U[3/4, 4/3], the first
    that fits wins, its position uniform; else the central crop of the nearest allowed aspect ratio.
    """
    n = len(width)
    width, height = width.astype(np.float64), height.astype(np.float64)
    target = (width * height)[:, None] * rng.uniform(*area, (n, 10))
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


def jpeg_size(b: bytes) -> tuple[int, int] | None:
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
        size = jpeg_size(raw)
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


class AugParams:
    """Per-batch random parameters of both views, from a numpy Generator.

    Called once per batch with the images' sizes (in iteration order). The generator is reseeded per
    batch when the caller gives a batch seed (the loader derives it from the data position), so the
    augmentation of a sample does not depend on threads, prefetching or restarts. Returns the decode
    region (the union of both views' crop windows: start and end (y, x)), then per view: crop window
    start and end (y, x) inside that region, colour_on (bool), M (3x3), k, blur_on (bool), horizontal
    kernel (1, n), vertical kernel (n, 1), solarize (bool), mirror (int32). Fixed-shape ones are whole-batch
    arrays. The views may differ in their probabilities (moco_v3): view 0 is q (x1), view 1 is k (x2).
    """

    OUTPUTS_PER_VIEW = 10

    def __init__(self, recipe: str, batch_size: int, seed: int, size: int = 224):
        if recipe not in _RECIPES:
            raise ValueError(f"unknown augmentation recipe {recipe!r}; expected one of {sorted(_RECIPES)}")
        self.r = _RECIPES[recipe]
        self.sigma = blur_sigma_range(size)
        self.n = batch_size
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def draw(self, view: int = 0) -> dict[str, np.ndarray]:
        """One view's per-sample decisions and factors, as the recipe specifies them."""
        r, n, rng = self.r, self.n, self.rng
        jitter = rng.random(n) < r.jitter_p
        lo, hi = 1.0 - _JITTER, 1.0 + _JITTER
        f = {
            "jitter": jitter,
            "brightness": np.where(jitter, rng.uniform(lo, hi, n), 1.0),
            "contrast": np.where(jitter, rng.uniform(lo, hi, n), 1.0),
            "saturation": np.where(jitter, rng.uniform(1.0 - r.saturation, 1.0 + r.saturation, n), 1.0),
            "hue": np.where(jitter, rng.uniform(-r.hue, r.hue, n), 0.0),
            "gray": rng.random(n) < r.gray_p,
            "blur": rng.random(n) < r.blur_p[view],
            "sigma": rng.uniform(*self.sigma, n),
            "mirror": rng.random(n) < 0.5,
        }
        # drawn last and only by views that solarize, so the other recipes' streams are what they were
        f["solarize"] = rng.random(n) < r.solarize_p[view] if r.solarize_p[view] else np.zeros(n, bool)
        return f

    def _view(self, view: int = 0) -> list:
        f = self.draw(view)
        saturation = np.where(f["gray"], 0.0, f["saturation"])  # grayscale: chroma scaled to 0
        m, k = colour_matrix(f["brightness"], f["contrast"], saturation, f["hue"])
        kernels = [_kernel_pair(int(round(sg * 1000))) if on else _NO_BLUR for sg, on in zip(f["sigma"], f["blur"])]
        colour_on = f["jitter"] | f["gray"]
        return [colour_on, m, k, f["blur"], [h for h, _ in kernels], [v for _, v in kernels], f["solarize"],
                f["mirror"].astype(np.int32)]

    def draw_views(self, sizes: Sequence[tuple[int, int]]) -> list[tuple]:
        """Both views' parameters for images of these (width, height): per view, the crop window as
        (top, left, h, w) arrays, then colour_on, M, k, blur_on, horizontal and vertical kernels, solarize, mirror."""
        wh = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        area = (self.r.area_min, 1.0)
        # q's crop and colour, then k's: each view drawn as a whole
        return [(*crop_windows(self.rng, wh[:, 0], wh[:, 1], area), *self._view(view)) for view in range(2)]

    def __call__(self, sizes: Sequence[tuple[int, int]]) -> tuple:
        """The DALI graph's feed: the decode region, then each view's window inside it and its parameters."""
        windows = [(np.stack([top, left], 1), np.stack([top + h, left + w], 1), view)
                   for top, left, h, w, *view in self.draw_views(sizes)]
        start = np.minimum(windows[0][0], windows[1][0])  # the region both views need: decoded, nothing else
        end = np.maximum(windows[0][1], windows[1][1])
        out = [start.astype(np.int32), end.astype(np.int32)]
        for w_start, w_end, view in windows:
            out += [(w_start - start).astype(np.float32), (w_end - start).astype(np.float32), *view]
        return tuple(out)
