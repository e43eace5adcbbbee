"""Decode one input fully with PIL and turn it into shard-ready bytes, or a reject reason.

Why decode fully: DALI cannot skip a corrupt image by itself, so anything that reaches a
shard must already have been decoded end to end (`img.load()`), not just header-sniffed; and bytes
kept as they are must pass the loader's own image rules (pipeline.image_check: the JPEG marker walk, the
format variants DALI rejects, the pixel budget) and DALI's decoder (pipeline.dali_check), which is stricter
than PIL. One rule set, so that the loader can trust a shard set this validated (image_check.trusted).
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from mocostream.pipeline.dali_check import dali_problem
from mocostream.pipeline.image_check import MAX_PIXELS, variant_problem
from .dedup import image_digest

# Reject reason codes (the complete set; manifests and rejects.jsonl use only these).
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
DECOMPRESSION_BOMB = "decompression_bomb"
UNREADABLE = "unreadable"
TOO_SMALL = "too_small"
UNSUPPORTED = "unsupported"
NEEDS_REENCODE = "needs_reencode"    # --reencode never, but the image is not usable as it is
# Decided outside this module (worker pool, fetch, dedup), listed here so the set is in one place.
TIMEOUT = "timeout"                  # decoding took longer than the per-file time budget
CRASHED = "crashed"                  # the decoder process died (segfault, out of memory)
DOWNLOAD_FAILED = "download_failed"  # a non-http URL (s3://, ...) could not be read
DUPLICATE = "duplicate"              # same pixels (exact) or same picture (perceptual) as an earlier input
# http(s) downloads (shards.download); TIMEOUT there means no answer within --http-timeout.
HTTP_ERROR = "http_error"            # an HTTP status other than 2xx (detail: the code)
DNS = "dns"                          # the host name does not resolve
CONNECTION = "connection"            # refused, reset, cut short, bad URL
OPTED_OUT = "opted_out"              # X-Robots-Tag noai / noimageai / noindex / noimageindex
TOO_LARGE = "too_large"              # body over --max-download-bytes
BLOCKED_ADDRESS = "blocked_address"  # a loopback/private/link-local/... address (--allow-private-addresses)
REASONS = (NOT_AN_IMAGE, TRUNCATED, DECOMPRESSION_BOMB, UNREADABLE, TOO_SMALL, UNSUPPORTED, NEEDS_REENCODE,
           TIMEOUT, CRASHED, DOWNLOAD_FAILED, DUPLICATE, HTTP_ERROR, DNS, CONNECTION, OPTED_OUT, TOO_LARGE,
           BLOCKED_ADDRESS)
REENCODE_MODES = ("auto", "always", "never")
RESIZE_MODES = ("longer", "shorter", "center_crop")  # which side --max-size caps; center_crop also squares
DEDUP_MODES = ("exact", "perceptual", "none")

MIN_SIDE = 8  # px; smaller images are icons/tracking pixels, useless for 224-px crops
JPEG_QUALITY = 95
# Formats kept byte-for-byte when already RGB and upright: every reader (PIL, DALI, torchvision) decodes them.
_KEEP = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}

_TRUNCATED_RE = re.compile(r"truncat|premature end|unexpected end|not enough data|end of file|"
                           r"buffer is not large enough|broken data stream|incomplete", re.I)
_UNSUPPORTED_RE = re.compile(r"not (?:available|supported|implemented)|unsupported|unable to locate|"
                             r"ghostscript|cannot find loader|unknown (?:raw )?mode|conversion from|not handled", re.I)


@dataclass(frozen=True)
class Options:
    """How to normalise one image (everything here changes the output bytes)."""
    min_size: int = MIN_SIDE            # drop images whose shorter side is under this (after rotation)
    max_size: int = 0                   # resize so the longer side is at most this; 0 = never resize
    resize_mode: str = "longer"         # longer | shorter: that side at most max_size; center_crop: shorter
    #                                     side at most max_size, then the centre square (never upscaled)
    quality: int = JPEG_QUALITY         # JPEG quality of re-encoded images
    reencode: str = "auto"              # auto: only when needed; always; never: reject what needs it
    max_pixels: int = MAX_PIXELS        # pixel budget per file (width x height of the first frame)
    dedup: str = "none"                 # which dedup hash to compute: exact | perceptual | none


@dataclass(frozen=True)
class Sample:
    data: bytes
    ext: str  # "jpg" | "png" | "webp" (lowercase: DALI matches extensions case-sensitively)
    width: int
    height: int
    digest: str = ""  # dedup hash (shards.dedup), "" when dedup is off


@dataclass(frozen=True)
class Reject:
    reason: str  # one of REASONS
    detail: str


def _short(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):  # its message only repeats a BytesIO repr
        return "no image format recognised the file"
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text[:200]


def classify(exc: BaseException) -> str:
    """Map a PIL/decoder exception to a reason code (best effort on the message)."""
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return DECOMPRESSION_BOMB
    if isinstance(exc, UnidentifiedImageError):
        return NOT_AN_IMAGE
    if isinstance(exc, EOFError):
        return TRUNCATED
    if isinstance(exc, NotImplementedError):
        return UNSUPPORTED
    msg = str(exc)
    if _TRUNCATED_RE.search(msg):
        return TRUNCATED
    if _UNSUPPORTED_RE.search(msg):
        return UNSUPPORTED
    if isinstance(exc, MemoryError):
        return DECOMPRESSION_BOMB  # a header promising more memory than we have is a bomb in practice
    return UNREADABLE  # corrupt data the decoder choked on (or an I/O error)


def _orientation(img: Image.Image) -> int:
    # Broken EXIF blocks are common on the web; they only cost us the orientation, not the image.
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:
        return 1


def _png_bit_depth(data: bytes) -> int:
    return data[24] if len(data) > 24 and data[12:16] == b"IHDR" else 0


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _high_bit_to_l(img: Image.Image) -> Image.Image:
    """16-bit / int / float greyscale -> 8-bit L by scaling, where PIL's convert would clip to white."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        a = a.astype(np.uint32) >> 8
    elif img.mode == "I":
        a = np.clip(a, 0, 65535) >> 8 if a.max(initial=0) > 255 else np.clip(a, 0, 255)
    else:  # "F": treat [0, 1] as normalised, anything else as already 0..255
        a = a * 255.0 if a.max(initial=0.0) <= 1.0 else a
        a = np.clip(np.nan_to_num(a), 0, 255)
    return Image.fromarray(a.astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency composited on white (black would invent dark edges)."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_bit_to_l(img)
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img if img.mode == "RGB" else img.convert("RGB")  # RGB already: no copy (a resize copies anyway)


def _changes_needed(img: Image.Image, data: bytes, fmt: str, orientation: int, animated: bool) -> list[str]:
    """Why the original bytes cannot be stored as they are (empty: keep them byte-for-byte)."""
    needs = []
    if fmt not in _KEEP:
        needs.append(f"format {fmt or 'unknown'} (not decodable by DALI)")
    if img.mode != "RGB":
        needs.append(f"mode {img.mode}")
    if orientation != 1:
        needs.append(f"EXIF orientation {orientation}")
    if animated:
        needs.append("animated")
    if "transparency" in img.info:
        needs.append("transparency")
    if fmt == "PNG" and _png_bit_depth(data) != 8:
        needs.append(f"{_png_bit_depth(data)}-bit PNG")
    if fmt in ("JPEG", "MPO", "PNG", "WEBP"):  # formats DALI would read as they are: the loader's rules
        problem = variant_problem(img, data)
        if problem is not None:
            needs.append(problem[1])
    return needs


def _fit(size: tuple[int, int], max_size: int, mode: str = "longer") -> tuple[int, int]:
    """`size` scaled so its longer (mode longer) or shorter side is max_size; never larger than `size`."""
    w, h = size
    scale = min(1.0, max_size / (max(w, h) if mode == "longer" else min(w, h)))
    return max(1, round(w * scale)), max(1, round(h * scale))


def _needs_resize(size: tuple[int, int], opt: Options) -> bool:
    if opt.max_size <= 0:
        return False
    if opt.resize_mode == "center_crop" and size[0] != size[1]:
        return True
    return (max(size) if opt.resize_mode == "longer" else min(size)) > opt.max_size


def _resize(img: Image.Image, opt: Options) -> Image.Image:
    size = _fit(img.size, opt.max_size, opt.resize_mode)
    if size != img.size:
        # Bicubic (antialiased when shrinking, like every PIL filter): 0.6x Lanczos's CPU, and JPEG draft
        # decoding has already done most of a large reduction.
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if opt.resize_mode == "center_crop":
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    return img


def _normalise(data: bytes, opt: Options) -> Sample | Reject:
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    if width * height > opt.max_pixels:
        return Reject(DECOMPRESSION_BOMB, f"{width}x{height} exceeds {opt.max_pixels} pixels")
    fmt = img.format or ""
    animated = bool(getattr(img, "is_animated", False))
    orientation = _orientation(img)
    upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    if min(upright) < opt.min_size:
        img.load()  # still decode it: a tiny file can be corrupt too, and corrupt wins over small
        return Reject(TOO_SMALL, f"{upright[0]}x{upright[1]} is under {opt.min_size} px on a side")
    resize = _needs_resize(upright, opt)
    if resize and fmt == "JPEG" and opt.reencode != "never":
        # Decode at 1/2, 1/4 or 1/8 scale (DCT scaling): still decodes every entropy-coded block, so
        # truncation is still caught, at a fraction of the cost. Never smaller than the target.
        img.draft("RGB", _fit((width, height), opt.max_size, opt.resize_mode))  # at least this size
    img.load()  # full decode of the first frame: raises on truncated/corrupt data
    needs = _changes_needed(img, data, fmt, orientation, animated)
    if not needs and not resize and opt.reencode != "always":
        # Bytes we would keep as they are must also pass DALI's own decoder (stricter than PIL on headers).
        problem = dali_problem(data, fmt)
        if problem:
            needs.append(problem)
    if opt.reencode == "never" and (needs or resize):
        return Reject(NEEDS_REENCODE, "; ".join(needs or ["larger than --max-size"]))
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    keep = opt.reencode != "always" and not needs and not resize
    rgb = img if keep else to_rgb(img)
    digest = image_digest(rgb, opt.dedup) if opt.dedup != "none" else ""
    if keep:
        return Sample(data, _KEEP[fmt], width, height, digest)
    if resize:
        rgb = _resize(rgb, opt)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=opt.quality)
    return Sample(buf.getvalue(), "jpg", rgb.width, rgb.height, digest)


def normalise(data: bytes, max_pixels: int = MAX_PIXELS, options: Options | None = None) -> Sample | Reject:
    """Validate `data` by decoding it fully; return shard-ready bytes or why it was left out.

    Never raises for bad data: every exception becomes a Reject with a reason code.
    """
    opt = options or Options(max_pixels=max_pixels)
    if not data:
        return Reject(NOT_AN_IMAGE, "empty file")
    with warnings.catch_warnings():
        # Odd-but-valid files make PIL chatty; the bomb warning, though, must stop the decode.
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return _normalise(data, opt)
        except Exception as exc:  # data errors are data: classify, never crash
            return Reject(classify(exc), _short(exc))
