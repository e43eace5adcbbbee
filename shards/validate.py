"""Decode one input fully with PIL and turn it into shard-ready bytes, or a reject reason.

Why decode fully: DALI cannot skip a corrupt image by itself, so anything that reaches a
shard must already have been decoded end to end (`img.load()`), not just header-sniffed.
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# Reject reason codes (the complete set; manifests and rejects.jsonl use only these).
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
DECOMPRESSION_BOMB = "decompression_bomb"
UNREADABLE = "unreadable"
TOO_SMALL = "too_small"
UNSUPPORTED = "unsupported"
REASONS = (NOT_AN_IMAGE, TRUNCATED, DECOMPRESSION_BOMB, UNREADABLE, TOO_SMALL, UNSUPPORTED)

MIN_SIDE = 8  # px; smaller images are icons/tracking pixels, useless for 224-px crops
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's own default bomb limit (~89.5 Mpx)
JPEG_QUALITY = 95
# Formats kept byte-for-byte when already RGB and upright: every reader (PIL, DALI, torchvision) decodes them.
_KEEP = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}

_TRUNCATED_RE = re.compile(r"truncat|premature end|unexpected end|not enough data|end of file|"
                           r"buffer is not large enough|broken data stream|incomplete", re.I)
_UNSUPPORTED_RE = re.compile(r"not (?:available|supported|implemented)|unsupported|unable to locate|"
                             r"ghostscript|cannot find loader|unknown (?:raw )?mode|conversion from|not handled", re.I)


@dataclass(frozen=True)
class Sample:
    data: bytes
    ext: str  # "jpg" | "png" | "webp" (lowercase: DALI matches extensions case-sensitively)
    width: int
    height: int


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


def jpeg_structure_ok(data: bytes) -> bool:
    """Walk the JPEG marker segments from SOI to SOS; False if any length or marker is broken.

    PIL tolerates a corrupt header segment (it resyncs on the next marker) but DALI's
    nvImageCodec parser does not ("Invalid marker"), so such a file must be re-encoded
    rather than kept byte-for-byte.
    """
    if data[:2] != b"\xff\xd8":
        return False
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return True
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length field
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2:
            return False
        i += 2 + length
    return False


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
    return img.convert("RGB")


def _normalise(data: bytes, max_pixels: int) -> Sample | Reject:
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    if width * height > max_pixels:
        return Reject(DECOMPRESSION_BOMB, f"{width}x{height} exceeds {max_pixels} pixels")
    fmt = img.format or ""
    animated = bool(getattr(img, "is_animated", False))
    img.load()  # full decode of the first frame: raises on truncated/corrupt data
    orientation = _orientation(img)
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    width, height = img.size
    if min(width, height) < MIN_SIDE:
        return Reject(TOO_SMALL, f"{width}x{height} is under {MIN_SIDE} px on a side")
    keep = (fmt in _KEEP and img.mode == "RGB" and orientation == 1 and not animated
            and "transparency" not in img.info and (fmt != "PNG" or _png_bit_depth(data) == 8)
            and (fmt != "JPEG" or jpeg_structure_ok(data)))
    if keep:
        return Sample(data, _KEEP[fmt], width, height)
    buf = io.BytesIO()
    to_rgb(img).save(buf, "JPEG", quality=JPEG_QUALITY)
    return Sample(buf.getvalue(), "jpg", width, height)


def normalise(data: bytes, max_pixels: int = MAX_PIXELS) -> Sample | Reject:
    """Validate `data` by decoding it fully; return shard-ready bytes or why it was left out.

    Never raises for bad data: every exception becomes a Reject with a reason code.
    """
    if not data:
        return Reject(NOT_AN_IMAGE, "empty file")
    with warnings.catch_warnings():
        # Odd-but-valid files make PIL chatty; the bomb warning, though, must stop the decode.
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return _normalise(data, max_pixels)
        except Exception as exc:  # data errors are data: classify, never crash
            return Reject(classify(exc), _short(exc))


def normalise_file(path: str, max_pixels: int = MAX_PIXELS) -> Sample | Reject:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return Reject(UNREADABLE, _short(exc))
    return normalise(data, max_pixels)
