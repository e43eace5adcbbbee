"""Cheap pre-flight check of encoded image bytes, run before DALI.

DALI decodes a whole batch at once and cannot skip a bad sample: one corrupt file fails the batch.
So every sample goes through `check_image` first; a non-None answer is a reason code, and the sample is
skipped and counted under it.

    None                  decodable, and of a format DALI's decoder handles
    "not_an_image"        empty, text, or any bytes no image format recognises
    "truncated"           a recognised image whose data stops early
    "corrupt"             a recognised image that fails to decode (bad header, bad stream, zero size)
    "decompression_bomb"  more than `max_pixels` pixels (decoding it would exhaust memory)
    "unsupported_format"  a real image, but a format (or variant) DALI's decoder rejects: GIF, ICO, PSD,
                          TGA, ...; signed / 2-bit / 4-bit TIFF, old-style JPEG-in-TIFF, RLE BMP,
                          >8-bit JPEG 2000

Cost. JPEG, by far the common case, is decoded with `draft("RGB", (w//8, h//8))`: libjpeg then does
the full entropy (Huffman) decode but only a 1/8-scale IDCT, so truncation and stream errors are still
found. Other formats are decoded in full. Measured on the webphotos set (500 JPEGs, ~500x375, 47 KB) on
one core of the 2-core dev machine (shared, so +-20 %): 0.74-0.85 ms per image, ~1,200-1,350 images/s
(a full PIL decode: ~1.7 ms; the whole DALI CPU two-view v2 pipeline: ~9.5 CPU-ms per image). So it adds
under 10 % to the CPU cost of a sample. The DALI loader runs it off the training thread, on its own check
threads, up to two batches ahead, and not at all for shards whose manifest says `shards create` validated
them under the same rules (`validation_stamp`, `trusted`): in front of a GPU decoding ~3,000 images/s the
check would cost ~2-3 cores per GPU.

JPEG, PNG and WebP files that PIL decodes are then also asked of nvImageCodec, the library DALI's decoder
runs (pipeline/dali_check.py: JPEG as an 8x8 region, ~60 us; PNG/WebP in full): PIL tolerates broken
structures (unknown critical PNG chunks, bad IDAT checksums, no IEND) that fail a whole DALI batch.

The accepted set was checked against DALI: every file of the messy corpus (Pillow's test images,
fuzzer crashes, EXIF rotations, huge photos) that this function accepts decodes with
fn.decoders.image on CPU (tests/test_augment.py::test_every_image_check_accepts_decodes_in_dali).
"""
from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from mocostream.pipeline.dali_check import dali_problem

# PIL's own decompression-bomb threshold (89.5 megapixels, ~270 MB as RGB): 7x a 12 MP camera photo,
# 3.7x the largest legitimate file in the messy corpus (6000x4000). More than that in a data loader is an
# attack or an accident.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

REASONS = ("not_an_image", "truncated", "corrupt", "decompression_bomb", "unsupported_format")

# Version of the rules an image must pass to reach DALI, all in this module: check_image enforces them at
# training time, and the shard tool (shards/validate.py) keeps bytes as they are only when they pass
# the same ones (jpeg_segments_ok, variant_problem, MAX_PIXELS, dali_problem), re-encoding the rest.
# Bump it when they get stricter, so that shard sets validated under older rules are checked again by
# the loader (trusted() then refuses their manifests' stamps).
CHECK_VERSION = 1


def validation_stamp(max_pixels: int) -> dict:
    """What `shards create` writes into the manifest (options.validated_by) for the shards it validated."""
    from mocostream.pipeline.dali_check import checker

    return {"check_version": CHECK_VERSION, "decoder": checker(), "max_pixels": max_pixels}


def trusted(stamp: dict | None, max_pixels: int = MAX_PIXELS) -> bool:
    """True when a manifest's `validated_by` stamp promises what check_image would find: the same rules,
    DALI's own decoder (nvImageCodec) consulted, and no larger pixel budget than the loader's."""
    if not isinstance(stamp, dict):
        return False
    return (stamp.get("check_version") == CHECK_VERSION and str(stamp.get("decoder", "")).startswith("nvimgcodec")
            and isinstance(stamp.get("max_pixels"), int) and stamp["max_pixels"] <= max_pixels)

# PIL format name -> accepted. These are the formats fn.decoders.image (nvImageCodec) decodes on both
# the CPU and the mixed (GPU) backend: "JPEG, JPEG 2000, TIFF, PNG, BMP, PNM, PPM, PGM, PBM, WebP".
# MPO is a JPEG with extra frames appended; decoders read the first (JPEG) frame.
_DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "PPM", "JPEG2000", "WEBP"})


def jpeg_segments_ok(data: bytes) -> bool:
    """Walk a JPEG's (or MPO's first frame's) marker segments from SOI to the first SOS: False when any is
    broken. The shard tool (re-encode) and check_image (skip) both ask this one function.

    libjpeg (PIL) skips garbage between segments with a warning; nvImageCodec's JPEG parser (DALI) fails
    the image ("Invalid marker"). A wrong APPn length is the usual cause (photoshop-200dpi-broken.jpg).
    Strict where the two former copies of this walk differed: SOI only at the start (a second one is
    libjpeg's "two SOI markers" and nvImageCodec's "Invalid marker", not a segment to skip or to read a
    length from); a length under 2 is broken (it counts its own two bytes); MPO is walked like JPEG.
    """
    if data[:2] != b"\xff\xd8":
        return False
    n, i = len(data), 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # SOS: entropy-coded data follows, PIL's decode checks the rest
            return True
        if marker == 0xD8:
            return False
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length field
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2:
            return False
        i += 2 + length
    return False


def _tiff_ifds_ok(data: bytes) -> bool:
    """Walk the IFD chain (classic and BigTIFF): offsets inside the file, no cycles."""
    order = "little" if data[:2] == b"II" else "big"
    big = int.from_bytes(data[2:4], order) == 43
    off_size, cnt_size, entry = (8, 8, 20) if big else (4, 2, 12)
    offset = int.from_bytes(data[8:16] if big else data[4:8], order)
    seen: set[int] = set()
    while offset:
        if offset in seen or len(seen) > 10_000 or offset + cnt_size > len(data):
            return False
        seen.add(offset)
        count = int.from_bytes(data[offset:offset + cnt_size], order)
        nxt = offset + cnt_size + count * entry
        if nxt + off_size > len(data):
            return False
        offset = int.from_bytes(data[nxt:nxt + off_size], order)
    return bool(seen)


def variant_problem(img: Image.Image, data: bytes) -> tuple[str, str] | None:
    """(reason code, what) for a format variant PIL decodes but DALI's decoder rejects (found by decoding
    the messy corpus with fn.decoders.image on CPU): rare on the web, so refused rather than patched up.
    check_image skips such a sample; the shard tool re-encodes it rather than keep its bytes."""
    fmt = img.format
    # (WebP: DALI's docs say only the simple format, but its decoder (libwebp, also under "mixed") reads
    # the extended VP8X files too: alpha, ICC, EXIF, animation (first frame). Checked, so none refused.)
    if fmt in ("JPEG", "MPO") and not jpeg_segments_ok(data):
        return "corrupt", "broken JPEG marker segments (DALI's decoder rejects them)"
    if fmt == "PNG":
        actl = data.find(b"acTL", 0, 4096)  # APNG with num_frames == 0 is invalid
        if actl > 0 and int.from_bytes(data[actl + 4:actl + 8], "big") == 0:
            return "corrupt", "APNG with zero frames (DALI's decoder rejects it)"
    if fmt == "BMP" and img.info.get("compression", 0) in (1, 2):  # RLE: DALI fails on sloppy rows
        return "unsupported_format", "RLE-compressed BMP"
    if fmt == "JPEG2000" and img.mode not in ("L", "RGB", "RGBA", "LA"):  # >8-bit J2K
        return "unsupported_format", f"JPEG 2000 in mode {img.mode}"
    if fmt == "TIFF":
        return _tiff_problem(img, data)
    return None


def _tiff_problem(img: Image.Image, data: bytes) -> tuple[str, str] | None:
    tags = img.tag_v2
    if tags.get(259) == 6:  # old-style JPEG-in-TIFF, deprecated; DALI fails on some
        return "unsupported_format", "old-style JPEG-in-TIFF"
    if any(v != 1 for v in (tags.get(339) or (1,))):  # signed / float samples
        return "unsupported_format", "signed or floating-point TIFF samples"
    if any(b not in (1, 8, 16) for b in (tags.get(258) or (1,))):  # 2-, 4-, 32-bit samples
        return "unsupported_format", "TIFF samples of other than 1, 8 or 16 bits"
    if img.mode in ("I", "F"):
        return "unsupported_format", f"TIFF in mode {img.mode}"
    if not _tiff_ifds_ok(data):
        return "corrupt", "broken TIFF directory chain"
    return None


def _reason_for_error(err: BaseException) -> str:
    if isinstance(err, Image.DecompressionBombError):
        return "decompression_bomb"
    if isinstance(err, EOFError):
        return "truncated"
    text = str(err).lower()
    if "truncated" in text or "premature end" in text or "unexpected end" in text:
        return "truncated"
    return "corrupt"


def check_image(data: bytes, max_pixels: int = MAX_PIXELS) -> str | None:
    """None when `data` decodes as an image DALI handles; else a reason code (see module doc).

    Never raises for any input bytes.
    """
    if not data:
        return "not_an_image"
    # (No warnings.catch_warnings() here: it is not thread-safe, and this runs in loader threads.)
    try:
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            return "not_an_image"
        with img:
            w, h = img.size
            if w <= 0 or h <= 0:
                return "corrupt"
            if w * h > max_pixels:
                return "decompression_bomb"
            fmt = img.format
            if fmt not in _DALI_FORMATS:
                return "unsupported_format"
            variant = variant_problem(img, data)
            if variant is not None:
                return variant[0]
            if fmt in ("JPEG", "MPO"):
                # Reduced-scale but complete decode of the entropy-coded data.
                img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            img.load()
        if fmt in ("JPEG", "MPO", "PNG", "WEBP") and dali_problem(data, fmt) is not None:
            return "corrupt"
    except Image.DecompressionBombError:
        return "decompression_bomb"
    except UnidentifiedImageError:
        return "not_an_image"
    except Exception as err:  # OSError, SyntaxError, struct.error, ValueError, ...: PIL plugins raise
        return _reason_for_error(err)  # many kinds on hostile input; each is just a bad sample
    return None
