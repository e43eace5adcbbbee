"""MoCo two-view augmentation on the CPU with OpenCV: what the opencv backend's workers run.

The views are the DALI graph's (augment_dali.py), parameter for parameter: the same generator draws the
crop windows, colour maps, blur kernels and flips (aug_params.AugParams), seeded per chunk by the loader,
and each operation is the same maths:

    decode        cv2.imdecode (libjpeg-turbo), EXIF orientation applied; a JPEG whose two crop windows both
                  keep >= 2 S px is decoded at 1/2, 1/4 or 1/8 scale (DCT scaling), the windows mapped onto it
    crop + resize PIL's bilinear resize with antialiasing, over the window: the reference's own resampling
    colour        cv2.transform with colour_matrix's (M | k * mean luma), rounded and saturated to uint8
    blur          cv2.sepFilter2D with gaussian_kernel (PIL's GaussianBlur as one kernel), edges repeated
    solarize      cv2.LUT with PIL's solarize table (moco_v3's second view)
    flip          cv2.flip

OpenCV's kernels are SIMD loops: on ~500x375 web photos a view's colour map costs ~0.03 ms and its blur
~0.1 ms, where torchvision's four jitter ops and PIL's GaussianBlur take ~2 ms each, and where DALI's CPU
operators take ~1.3 ms (colour) and ~2.2 ms (resize): bench/cpu_ops.py. Images OpenCV cannot decode, and JPEGs without their end
marker, go through PIL's decode_rgb, which names the reason (truncated, corrupt, ...).
"""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from mocostream.pipeline.aug_params import LUMA, SOLARIZE_LUT, AugParams, image_size, jpeg_size
from mocostream.pipeline.augment_reference import UndecodableImage, decode_rgb
from mocostream.pipeline.image_check import MAX_PIXELS

_REDUCED = {1: 0, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
            8: cv2.IMREAD_REDUCED_GRAYSCALE_8}  # the scale bits alone; IMREAD_COLOR_RGB adds the colour


def jpeg_reduction(windows: list[tuple[int, int, int, int]], size: int) -> int:
    """The largest JPEG scale reduction (8, 4, 2, else 1) that leaves every (top, left, h, w) crop window at
    least `size` px on each side: the crop is then still shrunk to `size`, never enlarged."""
    shortest = min(min(h, w) for _, _, h, w in windows)
    return next((r for r in (8, 4, 2) if shortest >= r * size), 1)


def jpeg_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) after EXIF rotation of a whole JPEG (it ends with its EOI marker), else None."""
    if data[:2] != b"\xff\xd8" or not (data.endswith(b"\xff\xd9") or data.rstrip(b"\0").endswith(b"\xff\xd9")):
        return None
    return jpeg_size(data)


def decode(data: bytes, reduction: int | None) -> np.ndarray:
    """RGB uint8 (H, W, 3), EXIF orientation applied: a whole JPEG (jpeg_header_size) by OpenCV at 1/reduction
    scale; anything else (reduction None) by PIL. Raises UndecodableImage."""
    img = None
    if reduction is not None:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[reduction] | cv2.IMREAD_COLOR_RGB)
    if img is None:  # not a JPEG OpenCV reads: PIL decodes it, or says why it cannot
        img = np.asarray(decode_rgb(data))
    return img


def sizes_of(datas: list[bytes]) -> tuple[list[tuple[int, int]], list[str | None], list[bool]]:
    """Decoded (width, height) of each image, read from its header (PIL's for non-JPEGs), the reason when
    there is none, and whether it is a whole JPEG (OpenCV decodes those); a failed image gets a placeholder
    size so the batch's draws keep their shape."""
    sizes, reasons, jpegs = [], [], []
    for data in datas:
        size, reason = jpeg_header_size(data), None
        jpegs.append(size is not None)
        if size is None:  # PIL reads the header; what it cannot read, decode_rgb names
            try:
                size = image_size(data)
            except Exception:
                try:
                    size = decode_rgb(data).size
                except UndecodableImage as e:
                    size, reason = (1, 1), e.reason
        if reason is None and min(size) < 1:
            size, reason = (1, 1), "corrupt"
        elif reason is None and size[0] * size[1] > MAX_PIXELS:
            size, reason = (1, 1), "decompression_bomb"
        sizes.append(size)
        reasons.append(reason)
    return sizes, reasons, jpegs


def view(img: Image.Image, window: tuple, scale: tuple[float, float], params: tuple, size: int) -> np.ndarray:
    """One view, uint8 (3, S, S): the window (top, left, h, w) in full-size pixels, `scale` = decoded / full
    size (x, y); params = colour_on, M, k, blur_on, horizontal kernel, vertical kernel, solarize, mirror."""
    top, left, h, w = window
    sx, sy = scale
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    out = np.asarray(img.resize((size, size), Image.BILINEAR, box=box))
    colour_on, m, k, blur_on, kernel_h, kernel_v, solarize, mirror = params
    if colour_on:
        mean_luma = float(np.dot(cv2.mean(out)[:3], LUMA))
        out = cv2.transform(out, np.hstack([m, np.full((3, 1), k * mean_luma, np.float32)]))
    if blur_on:
        out = cv2.sepFilter2D(out, -1, kernel_h, kernel_v, borderType=cv2.BORDER_REPLICATE)
    if solarize:
        out = cv2.LUT(out, SOLARIZE_LUT)
    if mirror:
        out = cv2.flip(out, 1)
    return out.transpose(2, 0, 1)


def augment_images(datas: list[bytes], recipe: str, size: int, seed: int
                   ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Two views of each image: uint8 q, k of shape (n, 3, S, S) for the n decodable ones, and per input
    None or the reason it was skipped. One generator, seeded with `seed`, draws every parameter."""
    cv2.setNumThreads(1)  # one worker per CPU already: no nested thread pool
    sizes, reasons, jpegs = sizes_of(datas)
    params = AugParams(recipe, len(datas), seed, size).draw_views(sizes) if datas else []
    qs, ks = [], []
    for i, data in enumerate(datas):
        if reasons[i] is not None:
            continue
        windows = [tuple(int(a[i]) for a in p[:4]) for p in params]
        reduction = jpeg_reduction(windows, size) if jpegs[i] else None
        try:
            img = decode(data, reduction)
            # the windows are in header pixels: mapped onto the decoded ones (reduced scale, any disagreement)
            scale = (img.shape[1] / sizes[i][0], img.shape[0] / sizes[i][1])
            img = Image.fromarray(img)
            views = [view(img, win, scale, tuple(v[i] for v in p[4:]), size) for win, p in zip(windows, params)]
        except UndecodableImage as e:
            reasons[i] = e.reason
            continue
        except Exception:  # anything else a decoder raises on hostile input
            reasons[i] = "corrupt"
            continue
        qs.append(views[0])
        ks.append(views[1])
    empty = np.zeros((0, 3, size, size), np.uint8)
    return (np.stack(qs) if qs else empty), (np.stack(ks) if ks else empty), reasons
