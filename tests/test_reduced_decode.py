"""Decoding only the pixels the views need: crop windows keep torchvision's RandomResizedCrop statistics,
and the reduced decode (DALI: the region both windows cover; torch: JPEG DCT scaling) changes pixels by
rounding only."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms

import pipeline.augment_torch as augment_torch
from conftest import _need_archive, extract_members
from pipeline.augment_torch import two_view_transform


@pytest.fixture(scope="module")
def large_photos(tmp_path_factory) -> list[bytes]:
    """webphotos jpg_large/: ~1024x768 web photos, where most crop windows are >= 2 x 224 px."""
    root = extract_members(_need_archive("webphotos.tar.gz"), tmp_path_factory.mktemp("large"), "jpg_large", limit_per_dir=40)
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
    from pipeline.augment_dali import crop_windows

    n = 4000
    rng = np.random.default_rng(0)
    top, left, h, w = crop_windows(rng, np.full(n, width), np.full(n, height))
    ours = np.stack([top, left, h, w], 1).astype(float)
    assert_same_view_statistics(ours, reference_windows(width, height, n, seed=0), width, height)


def test_dali_decodes_the_union_region_and_views_match_a_full_decode(large_photos):
    """Decoding only the region both crop windows cover gives the views a full decode would."""
    ad = pytest.importorskip("pipeline.augment_dali")
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
    real = ad._AugParams.__call__
    regions = []

    def full_region(self, sizes):  # same draws; the region becomes the whole image, windows shifted into it
        out = list(real(self, sizes))
        start, end, n = out[0], out[1], ad._AugParams.OUTPUTS_PER_VIEW
        regions.append((start.copy(), end.copy()))
        for i in (2, 3, 2 + n, 3 + n):
            out[i] = out[i] + start.astype(np.float32)
        out[0] = np.zeros_like(start)
        out[1] = np.array([[h, w] for w, h in sizes], np.int32)
        return tuple(out)

    ad._AugParams.__call__ = full_region
    try:
        full_q, full_k = views()
    finally:
        ad._AugParams.__call__ = real
    start, end = regions[0]
    sizes = np.array([[h, w] for w, h in (ad.image_size(x) for x in data)])
    area = ((end - start).prod(1) / sizes.prod(1))
    assert area.min() < 0.9  # some regions really are smaller than the image
    # the resize may look one filter radius past the window: decoded-region edges differ by rounding at most
    assert (region_q - full_q).abs().mean() < 0.01 and (region_k - full_k).abs().mean() < 0.01


def test_torch_reduced_scale_decode_keeps_crop_statistics(large_photos, monkeypatch):
    """The torch backend draws both windows on the full-size image before decoding, then decodes at the
    smallest JPEG scale that keeps both >= 224 px: the windows' distribution is torchvision's."""
    t = two_view_transform("moco_v2", 224)
    drawn, reductions = [], []
    real_params, real_reduction = t.crop.get_params, augment_torch.jpeg_reduction

    def record_params(img, scale, ratio):
        drawn.append((img.shape[-1], img.shape[-2], *real_params(img, scale, ratio)))
        return drawn[-1][2:]

    def record_reduction(windows, size):
        reductions.append(real_reduction(windows, size))
        return reductions[-1]

    monkeypatch.setattr(t.crop, "get_params", record_params)
    monkeypatch.setattr(augment_torch, "jpeg_reduction", record_reduction)
    torch.manual_seed(0)
    random.seed(0)
    photo = large_photos[0]
    for _ in range(2000):
        q, k = t.from_bytes(photo)
    assert q.shape == k.shape == (3, 224, 224) and q.dtype == torch.uint8
    width, height = drawn[0][:2]
    ours = np.array([d[2:] for d in drawn], float)
    assert_same_view_statistics(ours, reference_windows(width, height, len(ours), seed=1), width, height)
    assert 0.2 < np.mean(np.array(reductions) > 1) < 1  # most pairs of large photos decode at 1/2 scale


def test_torch_reduced_scale_views_match_full_scale_views(large_photos, monkeypatch):
    """Same random draws, decoded at 1/2 or 1/4 scale or in full: the views differ by resampling rounding."""
    t = two_view_transform("moco_v2", 224)
    diffs, reduced = [], 0
    for i, photo in enumerate(large_photos[:20]):
        torch.manual_seed(i)
        random.seed(i)
        fast = t.from_bytes(photo)
        torch.manual_seed(i)
        random.seed(i)
        r = augment_torch.jpeg_reduction
        monkeypatch.setattr(augment_torch, "jpeg_reduction", lambda w, s: 1)
        full = t.from_bytes(photo)
        monkeypatch.setattr(augment_torch, "jpeg_reduction", r)
        reduced += not all(torch.equal(a, b) for a, b in zip(fast, full))
        diffs += [(a.float() - b.float()).abs().mean().item() for a, b in zip(fast, full)]
    assert reduced >= 5  # the reduced path was taken
    assert np.mean(diffs) < 3.0 and max(diffs) < 8.0, diffs  # grey levels out of 255


def test_header_size_is_the_decoded_size(messy_images):
    """The crop windows (and the decoded region) are drawn from the size read in the JPEG header, EXIF
    rotation applied: it must be the size the decoder outputs, for every JPEG of the messy corpus."""
    import io

    from PIL import Image, ImageOps

    from pipeline.augment_dali import _jpeg_size, image_size
    from pipeline.image_check import check_image

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
        rotated += _jpeg_size(data) is not None and expected != img.size
    assert checked >= 20 and rotated >= 2, (checked, rotated)
