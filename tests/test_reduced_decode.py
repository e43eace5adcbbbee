"""Decoding only the pixels the views need: crop windows keep torchvision's RandomResizedCrop statistics,
and the reduced decode (DALI: the region both windows cover; the OpenCV workers: JPEG DCT scaling) changes
pixels by rounding only."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms

import mocostream.pipeline.augment_cv as augment_cv
from mocostream.pipeline.aug_params import AugParams, image_size
from helpers import extract_members, need_archive


@pytest.fixture(scope="module")
def large_photos(tmp_path_factory) -> list[bytes]:
    """webphotos jpg_large/: ~1024x768 web photos, where most crop windows are >= 2 x 224 px."""
    root = extract_members(need_archive("webphotos.tar.gz"), tmp_path_factory.mktemp("large"), "jpg_large", limit_per_dir=40)
    paths = sorted(Path(root).rglob("*.jpg"))
    assert len(paths) >= 40
    return [p.read_bytes() for p in paths[:40]]


def ks_distance(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    cdf_a, cdf_b = np.searchsorted(a, grid, "right") / len(a), np.searchsorted(b, grid, "right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def reference_windows(width: int, height: int, n: int, seed: int) -> np.ndarray:
    """n windows (top, left, h, w) from torchvision's RandomResizedCrop(scale=(0.2, 1)).get_params."""
    torch.manual_seed(seed)
    crop = transforms.RandomResizedCrop(224, scale=(0.2, 1.0))
    shape = torch.empty(1, 1, 1).expand(1, height, width)
    return np.array([crop.get_params(shape, crop.scale, crop.ratio) for _ in range(n)], float)


def assert_same_view_statistics(ours: np.ndarray, ref: np.ndarray, width: int, height: int) -> None:
    # 4,000 draws each: a KS distance of 0.05 is far beyond chance (p < 1e-4) and far below any real change
    area = lambda w: w[:, 2] * w[:, 3] / (width * height)  # noqa: E731
    aspect = lambda w: np.log(w[:, 3] / w[:, 2])  # noqa: E731
    centre_x = lambda w: (w[:, 1] + w[:, 3] / 2) / width  # noqa: E731
    centre_y = lambda w: (w[:, 0] + w[:, 2] / 2) / height  # noqa: E731
    for name, stat in [("area", area), ("aspect", aspect), ("centre_x", centre_x), ("centre_y", centre_y)]:
        assert ks_distance(stat(ours), stat(ref)) < 0.05, (name, width, height)
    assert (ours[:, 0] >= 0).all() and (ours[:, 1] >= 0).all()
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()


@pytest.mark.parametrize("width,height", [(1024, 768), (500, 375), (375, 500), (2000, 300)])
def test_dali_crop_windows_match_random_resized_crop(width, height):
    """The DALI backend draws its windows in numpy, for a whole batch at once (2000x300: mostly the
    fallback central crop, as in torchvision)."""
    from mocostream.pipeline.aug_params import crop_windows

    n = 4000
    rng = np.random.default_rng(0)
    top, left, h, w = crop_windows(rng, np.full(n, width), np.full(n, height))
    ours = np.stack([top, left, h, w], 1).astype(float)
    assert_same_view_statistics(ours, reference_windows(width, height, n, seed=0), width, height)


def test_dali_decodes_the_union_region_and_views_match_a_full_decode(large_photos):
    """Decoding only the region both crop windows cover gives the views a full decode would."""
    ad = pytest.importorskip("mocostream.pipeline.augment_dali")
    b = 8
    data = [np.frombuffer(x, np.uint8) for x in large_photos[:b]]

    def source():
        return data, [np.array(i, np.int64) for i in range(b)], 123

    def views():
        pipe = ad.build_two_view_pipeline(source, batch_size=b, size=64, recipe="moco_v2", device="cpu",
                                          num_threads=1, seed=0)
        pipe.build()
        return ad.dali_outputs_to_torch(pipe.run(), "cpu")[:2]

    region_q, region_k = views()
    real = AugParams.__call__
    regions = []

    def full_region(self, sizes):  # same draws; the region becomes the whole image, windows shifted into it
        out = list(real(self, sizes))
        start, end, n = out[0], out[1], AugParams.OUTPUTS_PER_VIEW
        regions.append((start.copy(), end.copy()))
        for i in (2, 3, 2 + n, 3 + n):
            out[i] = out[i] + start.astype(np.float32)
        out[0] = np.zeros_like(start)
        out[1] = np.array([[h, w] for w, h in sizes], np.int32)
        return tuple(out)

    AugParams.__call__ = full_region
    try:
        full_q, full_k = views()
    finally:
        AugParams.__call__ = real
    start, end = regions[0]
    sizes = np.array([[h, w] for w, h in (image_size(x) for x in data)])
    area = ((end - start).prod(1) / sizes.prod(1))
    assert area.min() < 0.9  # some regions really are smaller than the image
    # the resize may look one filter radius past the window: decoded-region edges differ by rounding at most
    assert (region_q - full_q).abs().mean() < 0.01 and (region_k - full_k).abs().mean() < 0.01


def test_cv_decodes_large_photos_at_a_reduced_scale(large_photos, monkeypatch):
    """The OpenCV workers draw both windows (crop_windows, on the size in the JPEG header) before decoding,
    then decode at the smallest JPEG scale that keeps both >= 224 px: most large photos at 1/2."""
    reductions = []
    real = augment_cv.jpeg_reduction

    def record(windows, size):
        reductions.append(real(windows, size))
        assert all(min(h, w) >= reductions[-1] * size or reductions[-1] == 1 for _, _, h, w in windows)
        return reductions[-1]

    monkeypatch.setattr(augment_cv, "jpeg_reduction", record)
    q, k, reasons = augment_cv.augment_images(large_photos, "moco_v2", 224, seed=0)
    assert q.shape == k.shape == (len(large_photos), 3, 224, 224) and reasons == [None] * len(large_photos)
    assert 0.2 < np.mean(np.array(reductions) > 1) < 1


def test_cv_reduced_scale_views_match_full_scale_views(large_photos, monkeypatch):
    """Same draws, decoded at 1/2 or 1/4 scale or in full: the views differ by resampling rounding."""
    fast = augment_cv.augment_images(large_photos[:20], "moco_v2", 224, seed=5)
    monkeypatch.setattr(augment_cv, "jpeg_reduction", lambda windows, size: 1)
    full = augment_cv.augment_images(large_photos[:20], "moco_v2", 224, seed=5)
    diffs, reduced = [], 0
    for a, b in zip(fast[:2], full[:2]):
        per_view = np.abs(a.astype(float) - b.astype(float)).mean(axis=(1, 2, 3))
        reduced += int((per_view > 0).sum())
        diffs += per_view.tolist()
    assert reduced >= 5  # the reduced path was taken
    assert np.mean(diffs) < 3.0 and max(diffs) < 8.0, diffs  # grey levels out of 255


def test_header_size_is_the_decoded_size(messy_images):
    """The crop windows (and the decoded region) are drawn from the size read in the JPEG header, EXIF
    rotation applied: it must be the size the decoder outputs, for every JPEG of the messy corpus."""
    import io

    from PIL import Image, ImageOps

    from mocostream.pipeline.aug_params import jpeg_size
    from mocostream.pipeline.image_check import check_image

    checked = rotated = 0
    for path in sorted(Path(messy_images).rglob("*")):
        data = path.read_bytes() if path.is_file() else b""
        if data[:2] != b"\xff\xd8" or check_image(data) is not None:
            continue
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG":
                continue
            expected = ImageOps.exif_transpose(img).size
        assert image_size(np.frombuffer(data, np.uint8)) == expected, path.name
        checked += 1
        rotated += jpeg_size(data) is not None and expected != img.size
    assert checked >= 20 and rotated >= 2, (checked, rotated)
