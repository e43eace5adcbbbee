"""pipeline.image_check, pipeline.augment_reference, augment_cv and augment_dali on real photos."""
from __future__ import annotations

import io
import os
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms
import torchvision.transforms.functional as TF

from mocostream.pipeline.image_check import check_image
import mocostream.pipeline.aug_params as aug_params
from mocostream.pipeline.augment_cv import augment_images
from mocostream.pipeline.augment_reference import MEAN, STD, UndecodableImage, decode_rgb, normalize, reference_transform

RECIPES = ("moco_v1", "moco_v2", "moco_v3")
# PIL warns about the messy corpus's broken files (corrupt EXIF, bombs, bad APNG): expected there.
quiet_pil = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")


# ---------------------------------------------------------------- helpers / fixtures

@pytest.fixture(scope="module")
def photos(webphotos) -> list[bytes]:
    paths = sorted(Path(webphotos).glob("*.jpg"))
    assert len(paths) >= 100
    return [p.read_bytes() for p in paths[:128]]


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


class CyclingSource:
    """external_source callable: the next batch_size photos (cycling) and their ids."""

    def __init__(self, encoded: list[bytes], batch_size: int, id_shape=(), id_base: int = 1000):
        self.data = [np.frombuffer(b, dtype=np.uint8) for b in encoded]
        self.batch_size, self.id_shape, self.id_base = batch_size, id_shape, id_base
        self.i = 0
        self.ids_given: list[list[int]] = []

    def __call__(self):
        idx = [(self.i + j) % len(self.data) for j in range(self.batch_size)]
        self.i += self.batch_size
        # ids deliberately not sorted, not contiguous and large: they must come back as given
        ids = [self.id_base * 7919 * (j + 1) + (self.i * 31) % 1009 for j in range(self.batch_size)][::-1]
        self.ids_given.append(ids)
        return [self.data[i] for i in idx], [np.full(self.id_shape, v, dtype=np.int64) for v in ids]


def _dali():
    return pytest.importorskip("mocostream.pipeline.augment_dali")


def _cpu_pipe(source, batch_size, size, recipe, seed=0, num_threads=2):
    ad = _dali()
    pipe = ad.build_two_view_pipeline(source, batch_size=batch_size, size=size, recipe=recipe,
                                      device="cpu", num_threads=num_threads, seed=seed)
    pipe.build()
    return pipe


# ---------------------------------------------------------------- image_check

def test_check_image_accepts_real_jpeg_png_webp_bmp_tiff(photos):
    assert all(check_image(b) is None for b in photos[:20])
    img = Image.open(io.BytesIO(photos[0])).convert("RGB")
    for fmt, kw in [("PNG", {}), ("WEBP", {"quality": 80}), ("BMP", {}), ("TIFF", {}),
                    ("JPEG", {"progressive": True})]:
        assert check_image(_encode(img, fmt, **kw)) is None, fmt
    assert check_image(_encode(img.convert("L"), "PNG")) is None
    assert check_image(_encode(img.convert("RGBA"), "PNG")) is None


def test_check_image_reasons(photos, tmp_path):
    jpeg = photos[0]
    assert check_image(jpeg[: len(jpeg) // 2]) == "truncated"
    assert check_image(jpeg[: int(len(jpeg) * 0.95)]) == "truncated"
    assert check_image(b"") == "not_an_image"
    assert check_image(os.urandom(5000)) == "not_an_image"
    assert check_image(b"hello, this is a text file\n" * 50) == "not_an_image"
    assert check_image(Path(__file__).read_bytes()) == "not_an_image"
    # a segment length pointing into the middle of the next segment: PIL skips the garbage, DALI fails
    broken = bytearray(jpeg)
    assert broken[2] == 0xFF and 0xE0 <= broken[3] <= 0xEF  # APPn right after SOI
    broken[4:6] = (int.from_bytes(broken[4:6], "big") + 3).to_bytes(2, "big")
    assert check_image(bytes(broken)) == "corrupt"
    # header claims 30000 x 30000 pixels
    img = Image.new("RGB", (30000, 30000 // 300))
    bomb = bytearray(_encode(img, "PNG"))
    i = bomb.index(b"IHDR")
    bomb[i + 8:i + 12] = (30000).to_bytes(4, "big")  # height
    bomb[i + 17:i + 21] = zlib.crc32(bytes(bomb[i:i + 17])).to_bytes(4, "big")  # IHDR CRC
    assert check_image(bytes(bomb)) == "decompression_bomb"
    assert check_image(jpeg, max_pixels=1000) == "decompression_bomb"
    small = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((64, 48))
    assert check_image(_encode(small, "GIF")) == "unsupported_format"
    assert check_image(_encode(small.convert("RGBA"), "WEBP", lossless=True)) is None


@pytest.mark.slow
@quiet_pil
def test_check_image_never_raises_on_messy_corpus(messy_images):
    files = sorted(p for p in Path(messy_images).rglob("*") if p.is_file())
    assert len(files) > 400
    reasons = {}
    for p in files:
        r = check_image(p.read_bytes())
        assert r is None or r in ("not_an_image", "truncated", "corrupt", "decompression_bomb",
                                  "unsupported_format"), (p, r)
        reasons[p.relative_to(messy_images).as_posix()] = r
    assert reasons["pillow/decompression_bomb.gif"] == "decompression_bomb"
    assert reasons["pillow/background_outside_palette.gif"] == "unsupported_format"
    assert reasons["pillow/photoshop-200dpi-broken.jpg"] == "corrupt"
    assert reasons["pillow/hopper.png"] is None and reasons["exif-orientation/Landscape_5.jpg"] is None
    assert sum(r is None for r in reasons.values()) > 200


def _synthetic_variants(photo: bytes) -> list[bytes]:
    img = Image.open(io.BytesIO(photo)).convert("RGB").resize((96, 72))
    out = [_encode(img, f, **kw) for f, kw in [("PNG", {}), ("WEBP", {"quality": 80}), ("BMP", {}),
                                               ("TIFF", {}), ("JPEG", {"progressive": True}),
                                               ("JPEG2000", {}), ("PPM", {})]]
    out += [_encode(img.convert("RGBA"), "PNG"), _encode(img.convert("RGBA"), "WEBP", lossless=True),
            _encode(img.convert("L"), "JPEG"), _encode(img.convert("CMYK"), "JPEG"),
            _encode(img.convert("P"), "PNG"), _encode(img.convert("1"), "PNG"),
            _encode(img, "WEBP", save_all=True, append_images=[img.rotate(90)], duration=100)]
    return out


@pytest.mark.slow
@quiet_pil
@pytest.mark.parametrize("decoder", ["cpu", pytest.param("mixed", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))])
def test_every_image_check_accepts_decodes_in_dali(messy_images, photos, decoder):
    """The contract: check_image's None means DALI's decoder will not fail the batch."""
    _dali()
    from nvidia.dali import fn, pipeline_def, types

    files = sorted(p for p in Path(messy_images).rglob("*") if p.is_file())
    candidates = [p.read_bytes() for p in files] + _synthetic_variants(photos[0])
    ok = [np.frombuffer(b, np.uint8) for b in candidates if check_image(b) is None]
    assert len(ok) > 200

    @pipeline_def(batch_size=len(ok), num_threads=2, device_id=None if decoder == "cpu" else 0,
                  prefetch_queue_depth=1)
    def decode():
        return fn.decoders.image(fn.external_source(source=lambda: ok, batch=True), device=decoder,
                                 output_type=types.RGB)

    pipe = decode()
    pipe.build()
    (out,) = pipe.run()
    shapes = [out[i].shape() for i in range(len(ok))]
    assert all(len(s) == 3 and s[2] == 3 and s[0] > 0 and s[1] > 0 for s in shapes)


# ---------------------------------------------------------------- opencv backend (OpenCV workers)

@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("size", [32, 224])
def test_cv_two_views_shapes_independence_and_seed(photos, recipe, size):
    q, k, reasons = augment_images(photos[:6], recipe, size, seed=3)
    assert reasons == [None] * 6
    for v in (q, k):
        assert v.dtype == np.uint8 and v.shape == (6, 3, size, size)
    assert not np.array_equal(q, k)
    q2, k2, _ = augment_images(photos[:6], recipe, size, seed=3)
    assert np.array_equal(q, q2) and np.array_equal(k, k2)  # the chunk's seed decides every draw
    assert not np.array_equal(q, augment_images(photos[:6], recipe, size, seed=4)[0])
    ref = reference_transform(recipe, size)(decode_rgb(photos[1]))
    assert ref.dtype == torch.float32 and ref.shape == (3, size, size)


def test_cv_skips_bad_images_with_their_reason_and_keeps_the_rest(photos, messy_images):
    gray = Image.open(io.BytesIO(photos[0])).convert("L")
    exif = Path(messy_images) / "exif-orientation"
    datas = [photos[0], photos[0][:3000], b"", os.urandom(1000), _encode(gray, "PNG"),
             (exif / "Landscape_6.jpg").read_bytes(), photos[1]]
    q, k, reasons = augment_images(datas, "moco_v2", 32, seed=0)
    assert reasons == [None, "truncated", "not_an_image", "not_an_image", None, None, None]
    assert q.shape == k.shape == (4, 3, 32, 32)


@pytest.mark.slow
@quiet_pil
def test_cv_never_raises_on_messy_corpus(messy_images):
    """Every file of the messy corpus (truncated, corrupt, bombs, odd modes, CMYK, 16-bit, ...) either gives
    two views or a reason from image_check's list; one chunk holds them all, as a worker's chunk would."""
    from mocostream.pipeline.image_check import REASONS

    files = sorted(p for p in Path(messy_images).rglob("*") if p.is_file())
    datas = [p.read_bytes() for p in files]
    q, k, reasons = augment_images(datas, "moco_v2", 32, seed=0)
    assert len(reasons) == len(files)
    assert all(r is None or r in REASONS for r in reasons), {f.name: r for f, r in zip(files, reasons)}
    assert q.shape == k.shape == (sum(r is None for r in reasons), 3, 32, 32)
    assert q.shape[0] > 200
    by_name = {f.relative_to(messy_images).as_posix(): r for f, r in zip(files, reasons)}
    assert by_name["pillow/decompression_bomb.gif"] == "decompression_bomb"
    assert by_name["pillow/hopper.png"] is None and by_name["exif-orientation/Landscape_5.jpg"] is None


@pytest.mark.slow
def test_cv_decodes_like_pil_with_exif_orientation_applied(messy_images):
    """OpenCV's decode is the image PIL's decode_rgb gives (EXIF rotation included), up to IDCT rounding."""
    from mocostream.pipeline.augment_cv import decode

    for path in sorted((Path(messy_images) / "exif-orientation").glob("*.jpg")):
        data = path.read_bytes()
        ours, pil = decode(data, 1).astype(float), np.asarray(decode_rgb(data), float)
        assert ours.shape == pil.shape, path.name
        assert np.abs(ours - pil).mean() < 2, path.name


@pytest.mark.slow
def test_cv_views_are_the_dali_views_for_the_same_seed(photos):
    """The OpenCV workers draw the DALI graph's parameters and apply the same maths: one batch seed gives
    both backends the same views, up to decoder and resampling rounding (grey levels out of 255; at 224 px
    the two resamplers' antialiasing filters differ least: ~0.15 levels on average)."""
    ad = _dali()
    b, size, seed = 16, 224, 11
    for recipe in RECIPES:
        data = photos[:b]

        def source():
            return [np.frombuffer(x, np.uint8) for x in data], [np.array(i, np.int64) for i in range(b)], seed

        pipe = ad.build_two_view_pipeline(source, batch_size=b, size=size, recipe=recipe, device="cpu",
                                          num_threads=1, seed=0)
        pipe.build()
        dq, dk, _ = ad.dali_outputs_to_torch(pipe.run(), "cpu")
        q, k, _ = augment_images(data, recipe, size, seed)
        std = torch.tensor(STD).view(1, 3, 1, 1) * 255
        for ours, theirs in ((q, dq), (k, dk)):
            levels = ((normalize(ours) - theirs).abs() * std).mean(dim=(1, 2, 3))
            assert levels.mean() < 0.5 and levels.max() < 1.0, (recipe, levels)


def test_normalize_matches_totensor_normalize(photos):
    imgs = [decode_rgb(b).resize((40, 30)) for b in photos[:4]]
    batch = torch.stack([transforms.PILToTensor()(im) for im in imgs])
    ref = torch.stack([transforms.Normalize(MEAN, STD)(transforms.ToTensor()(im)) for im in imgs])
    out = normalize(batch)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert torch.equal(normalize(batch.numpy()), out)  # the loader's numpy path: the same float32 operations
    with pytest.raises(TypeError):
        normalize(batch.float())
    with pytest.raises(TypeError):
        normalize(batch.numpy().astype(np.float32))


def test_decode_rgb_errors_and_orientation(photos, messy_images):
    with pytest.raises(UndecodableImage) as e:
        decode_rgb(photos[0][:3000])
    assert e.value.reason == "truncated"
    for bad in (b"", b"not an image at all", os.urandom(1000)):
        with pytest.raises(UndecodableImage) as e:
            decode_rgb(bad)
        assert e.value.reason == "not_an_image"
    gray = Image.open(io.BytesIO(photos[0])).convert("L")
    assert decode_rgb(_encode(gray, "PNG")).mode == "RGB"
    # EXIF orientation 6 (rotate 90) is applied: the decoded image is as wide as orientation 1's
    exif = Path(messy_images) / "exif-orientation"
    upright = decode_rgb((exif / "Landscape_1.jpg").read_bytes())
    rotated = decode_rgb((exif / "Landscape_6.jpg").read_bytes())
    assert rotated.size == upright.size
    assert np.abs(np.asarray(rotated, float) - np.asarray(upright, float)).mean() < 20


def test_unknown_recipe():
    with pytest.raises(ValueError):
        augment_images([b""], "simclr", 224, seed=0)
    with pytest.raises(ValueError):
        reference_transform("simclr", 224)


# ---------------------------------------------------------------- DALI backend (CPU)

@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("size", [32, 224])
def test_dali_shapes_ids_and_views(photos, recipe, size):
    ad = _dali()
    b = 8
    src = CyclingSource(photos[:20], b, id_shape=(1,) if size == 32 else ())
    pipe = _cpu_pipe(src, b, size, recipe)
    for step in range(3):
        q, k, ids = ad.dali_outputs_to_torch(pipe.run(), "cpu")
        assert q.shape == k.shape == (b, 3, size, size)
        assert q.dtype == k.dtype == torch.float32
        assert ids.dtype == torch.int64 and ids.shape == (b,)
        assert ids.tolist() == src.ids_given[step]
        assert torch.isfinite(q).all() and torch.isfinite(k).all()
        assert not torch.equal(q, k)
        assert all(not torch.equal(q[i], k[i]) for i in range(b))
        # ImageNet-normalised pixel range: (0 - mean) / std .. (1 - mean) / std
        lo = min((0 - m) / s for m, s in zip(MEAN, STD))
        hi = max((1 - m) / s for m, s in zip(MEAN, STD))
        assert q.min() >= lo - 1e-4 and q.max() <= hi + 1e-4


def test_dali_runs_many_batches_from_cycling_source(photos):
    ad = _dali()
    b = 16
    src = CyclingSource(photos, b)
    pipe = _cpu_pipe(src, b, 64, "moco_v2")
    seen = []
    for _ in range(10):  # 160 samples: cycles past the 128 photos
        q, k, ids = ad.dali_outputs_to_torch(pipe.run(), "cpu")
        assert q.shape == (b, 3, 64, 64)
        seen += ids.tolist()
    assert seen == [v for batch in src.ids_given[:10] for v in batch]


def test_dali_seed_reproducible(photos):
    ad = _dali()

    def run(seed, threads):
        pipe = _cpu_pipe(CyclingSource(photos[:16], 8), 8, 48, "moco_v2", seed=seed, num_threads=threads)
        return [ad.dali_outputs_to_torch(pipe.run(), "cpu") for _ in range(2)]

    a, b, c = run(7, 2), run(7, 1), run(8, 2)
    for (qa, ka, _), (qb, kb, _) in zip(a, b):
        assert torch.equal(qa, qb) and torch.equal(ka, kb)
    assert not torch.equal(a[0][0], c[0][0])


@pytest.mark.slow
def test_both_backends_distribution_close_to_the_reference_recipe(photos):
    """Per-channel mean / std over many views against torchvision's recipe, view by view (moco_v3's two views
    differ: blur 1.0 / 0.1, solarize 0 / 0.2): a distribution check, loose tolerance (DALI and the OpenCV
    workers clamp once, and rotate hue about the gray axis)."""
    ad = _dali()
    data = photos * 2  # two views of each photo: one solarized bright photo moves a mean of 96 views by ~0.1
    for recipe in RECIPES:
        b, size = 32, 64
        pipe = _cpu_pipe(CyclingSource(data, b), b, size, recipe, seed=1)
        dali_q, dali_k = [], []
        for _ in range(len(data) // b):
            q, k, _ = ad.dali_outputs_to_torch(pipe.run(), "cpu")
            dali_q.append(q)
            dali_k.append(k)
        cv_q, cv_k = (normalize(v) for v in augment_images(data, recipe, size, seed=1)[:2])
        torch.manual_seed(1)
        random.seed(1)
        for view, dali_views, cv_views in ((0, torch.cat(dali_q), cv_q), (1, torch.cat(dali_k), cv_k)):
            t = reference_transform(recipe, size, view)
            r = torch.stack([t(decode_rgb(raw)) for raw in data])
            rm, rs = r.mean(dim=(0, 2, 3)), r.std(dim=(0, 2, 3))
            for name, d in (("dali", dali_views), ("cv", cv_views)):
                assert d.shape == r.shape
                dm, ds = d.mean(dim=(0, 2, 3)), d.std(dim=(0, 2, 3))
                assert (dm - rm).abs().max() < 0.3, (name, recipe, view, dm, rm)
                assert (ds - rs).abs().max() < 0.2, (name, recipe, view, ds, rs)
                # and the augmentation really happens: views of one image differ in colour statistics
                spread = d.mean(dim=(2, 3)).std(dim=0)
                assert (spread > 0.5).all(), (name, view, spread)


def test_solarize_is_pils_in_both_backends(photos):
    """moco_v3's solarize: DALI's lookup table and OpenCV's LUT give PIL's ImageOps.solarize exactly."""
    import cv2

    ad = _dali()
    from nvidia.dali import fn, pipeline_def

    img = np.asarray(decode_rgb(photos[2]).resize((64, 48)))
    ref = np.asarray(ImageOps.solarize(Image.fromarray(img)))
    assert (img >= 128).any() and not np.array_equal(ref, img)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def p():
        return ad._solarize(fn.external_source(source=lambda: [img], batch=True, layout="HWC"))

    pipe = p()
    pipe.build()
    assert np.array_equal(np.asarray(pipe.run()[0][0]), ref)
    assert np.array_equal(cv2.LUT(img, aug_params.SOLARIZE_LUT), ref)


def test_dali_colour_ops_match_torchvision(photos):
    """brightness / contrast / saturation / grayscale: torchvision's maths (up to rounding); hue: the
    right direction and units (turns x 360)."""
    ad = _dali()
    from nvidia.dali import fn, pipeline_def

    pil = decode_rgb(photos[3]).resize((96, 72))
    img = np.asarray(pil)

    def apply(b=1.0, c=1.0, s=1.0, h=0.0):
        m, k = aug_params.colour_matrix([b], [c], [s], [h])

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def p():
            x = fn.external_source(source=lambda: [img], batch=True, layout="HWC")
            mm = fn.external_source(source=lambda: [m[0]], batch=True)
            kk = fn.external_source(source=lambda: [np.array(k[0])], batch=True)
            return ad._colour(x, mm, kk)  # the pipeline's own colour step

        pipe = p()
        pipe.build()
        return np.asarray(pipe.run()[0][0]).astype(float)

    def close(ours, ref, tol=1.0):
        assert np.abs(ours - np.asarray(ref, float)).mean() < tol

    close(apply(b=1.3), TF.adjust_brightness(pil, 1.3))
    close(apply(b=0.6), TF.adjust_brightness(pil, 0.6))
    close(apply(c=0.6), TF.adjust_contrast(pil, 0.6))
    close(apply(c=1.4), TF.adjust_contrast(pil, 1.4))
    close(apply(s=0.6), TF.adjust_saturation(pil, 0.6))
    close(apply(s=1.4), TF.adjust_saturation(pil, 1.4))
    close(apply(s=0.0), TF.rgb_to_grayscale(pil, 3))
    # hue: measure the mean HSV hue shift (weighted by saturation and value) it produces; torchvision's
    # adjust_hue(h) shifts by h turns (h * 360 degrees; x180 would be a units bug)
    for h in (0.1, -0.1, 0.3):
        shift = _mean_hue_shift(img, apply(h=h))
        tv = _mean_hue_shift(img, np.asarray(TF.adjust_hue(pil, h)))
        assert abs(shift - h * 360) < 8 and abs(shift - tv) < 8, (h, shift, tv)


def _mean_hue_shift(before: np.ndarray, after: np.ndarray) -> float:
    hsv = [np.asarray(Image.fromarray(np.asarray(x, np.uint8)).convert("HSV"), float) / 255
           for x in (before, after)]
    delta = (hsv[1][..., 0] - hsv[0][..., 0]) * 2 * np.pi
    weight = np.minimum(hsv[0][..., 1], hsv[1][..., 1]) * hsv[0][..., 2]
    return float(np.degrees(np.angle(np.sum(weight * np.exp(1j * delta)))))


def test_dali_blur_matches_pil_gaussian_blur(photos):
    ad = _dali()
    from nvidia.dali import fn, pipeline_def

    # a real photo plus per-pixel noise, so that even a small blur changes every pixel
    rng = np.random.default_rng(0)
    photo = np.asarray(decode_rgb(photos[5]).resize((128, 96)), dtype=np.int16)
    img = np.clip(photo + rng.integers(-40, 41, photo.shape), 0, 255).astype(np.uint8)
    pil = Image.fromarray(img)
    for sigma in (0.3, 0.5, 1.0, 2.0):
        w = aug_params.gaussian_kernel(sigma)
        x = np.arange(len(w)) - len(w) // 2
        assert len(w) % 2 == 1 and abs(w.sum() - 1) < 1e-6 and np.allclose(w, w[::-1])
        assert abs((w * x * x).sum() - sigma ** 2) < 0.02 * sigma ** 2 + 1e-3  # PIL matches the variance

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def p():
            x = fn.external_source(source=lambda: [img], batch=True, layout="HWC")
            kh = fn.external_source(source=lambda: [w[None, :]], batch=True)
            kv = fn.external_source(source=lambda: [np.ascontiguousarray(w[:, None])], batch=True)
            return ad._blur(x, kh, kv)  # the pipeline's own blur step

        pipe = p()
        pipe.build()
        ours = np.asarray(pipe.run()[0][0]).astype(float)
        ref = np.asarray(pil.filter(ImageFilter.GaussianBlur(radius=sigma)), float)
        err, unblurred = np.abs(ours - ref).mean(), np.abs(img - ref).mean()
        assert err < 1.0 and err < unblurred / 3, (sigma, err, unblurred)  # rounding-level differences


def test_dali_recipe_probabilities():
    ad = _dali()
    n = 20000
    for recipe, view, jitter_p, hue, sat, blur_p, solarize_p in [
            ("moco_v2", 0, 0.8, 0.1, 0.4, 0.5, 0.0), ("moco_v1", 0, 1.0, 0.4, 0.4, 0.0, 0.0),
            ("moco_v3", 0, 0.8, 0.1, 0.2, 1.0, 0.0), ("moco_v3", 1, 0.8, 0.1, 0.2, 0.1, 0.2)]:
        params = aug_params.AugParams(recipe, n, seed=0)
        f = params.draw(view)
        assert abs(f["jitter"].mean() - jitter_p) < 0.02
        assert abs(f["gray"].mean() - 0.2) < 0.02
        assert abs(f["blur"].mean() - blur_p) < 0.02
        assert abs(f["solarize"].mean() - solarize_p) < 0.02
        assert abs(f["mirror"].mean() - 0.5) < 0.02
        j = f["jitter"]
        for name, s in (("brightness", 0.4), ("contrast", 0.4), ("saturation", sat)):  # ColorJitter: U[1-s, 1+s]
            v = f[name][j]
            assert 1 - s <= v.min() < 1 - 0.97 * s and 1 + 0.97 * s < v.max() <= 1 + s and abs(v.mean() - 1) < 0.02
            assert (f[name][~j] == 1).all()
        assert -hue <= f["hue"].min() < -0.98 * hue and 0.98 * hue < f["hue"].max() <= hue
        assert 0.1 <= f["sigma"].min() and f["sigma"].max() <= 2.0

        colour_on, m, k, blur_on, kh, kv, solarize, mirror = params._view(view)
        m = np.stack(m)
        assert abs(np.mean(colour_on) - (1 - (1 - jitter_p) * 0.8)) < 0.02  # jitter or gray
        # grayscale rows: every output channel is the same luma combination
        same = np.abs(m[:, 0] - m[:, 1]).max(axis=1) + np.abs(m[:, 1] - m[:, 2]).max(axis=1)
        assert abs((same < 1e-6).mean() - 0.2) < 0.02
        radii = [w.shape[1] // 2 for w, on in zip(kh, blur_on) if on]
        if blur_p:
            assert min(radii) == 1 and max(radii) == 6  # sigma 0.1 .. 2.0
        # every row of M sums to b * c (the gain along the gray axis)
        gain = m.sum(axis=2)[:, 0]
        assert gain.min() >= 0.36 - 1e-5 and gain.max() <= 1.96 + 1e-5
    # crop areas: U[0.2, 1] of the image (v1, v2), U[0.08, 1] (v3), on images large enough never to fall back
    for recipe, area_min in (("moco_v2", 0.2), ("moco_v3", 0.08)):
        sizes = [(1000, 1000)] * 4000
        top, left, h, w, *_ = aug_params.AugParams(recipe, 4000, seed=0).draw_views(sizes)[1]
        area = h * w / 1e6
        assert area_min <= area.min() + 0.005 and area.min() < area_min + 0.01 and area.max() <= 1.0
    with pytest.raises(ValueError):
        ad.build_two_view_pipeline(lambda: None, batch_size=2, size=32, recipe="byol", device="cpu",
                                   num_threads=1, seed=0)
    with pytest.raises(ValueError):
        ad.build_two_view_pipeline(lambda: None, batch_size=2, size=32, recipe="moco_v2", device="tpu",
                                   num_threads=1, seed=0)


def test_v1_v2_draws_are_unchanged_by_the_v3_options():
    """The v1/v2 parameter streams are the ones drawn before v3 existed (a seed keeps giving the same views):
    the first brightness factors of seed 0's first v2 view."""
    f = aug_params.AugParams("moco_v2", 4, seed=0).draw()
    rng = np.random.default_rng(0)
    jitter = rng.random(4) < 0.8
    assert np.array_equal(f["jitter"], jitter)
    assert np.allclose(f["brightness"], np.where(jitter, rng.uniform(0.6, 1.4, 4), 1.0))
    assert not f["solarize"].any()


def test_dali_outputs_survive_later_runs(photos):
    """dali_outputs_to_torch shares DALI's output memory: it must not be overwritten by later runs."""
    ad = _dali()
    pipe = _cpu_pipe(CyclingSource(photos[:8], 4), 4, 32, "moco_v2")
    first = ad.dali_outputs_to_torch(pipe.run(), "cpu")
    kept = [t.clone() for t in first]
    later = [ad.dali_outputs_to_torch(pipe.run(), "cpu") for _ in range(6)]
    assert not torch.equal(later[-1][0], kept[0])
    for a, b in zip(first, kept):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- GPU paths

def test_gpu_graph_places_every_image_op_on_gpu():
    """Runs without a GPU: the device="gpu" graph is defined (not built) and inspected."""
    ad = _dali()
    for recipe in RECIPES:
        pipe = ad.build_two_view_pipeline(lambda: None, batch_size=4, size=32, recipe=recipe, device="gpu",
                                          num_threads=1, seed=0, device_id=0)
        pipe._build_graph()
        placement = {}
        for op in pipe._ops:
            kind = type(op._op).__name__ if op._op is not None else op.name
            devices = {op.spec.OutputDevice(i) for i in range(op.spec.NumOutput())}
            placement.setdefault(kind, set()).update(devices)
        assert placement["ImageSlice"] == {"gpu"}  # the mixed region decoder: CPU bytes in, GPU image out
        for kind in ("Resize", "CoordTransform", "Cast", "CropMirrorNormalize", "Mean"):
            assert placement[kind] == {"gpu"}, (kind, placement[kind])
        if recipe != "moco_v1":
            assert placement["Filter"] == {"gpu"}
        else:
            assert "Filter" not in placement or placement["Filter"] == {"gpu"}
        if recipe == "moco_v3":
            assert placement["LookupTable"] == {"gpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_dali_gpu_pipeline_runs_and_matches_cpu_distribution(photos):
    ad = _dali()
    b, size = 32, 64
    pipe = ad.build_two_view_pipeline(CyclingSource(photos[:96], b), batch_size=b, size=size,
                                      recipe="moco_v2", device="gpu", num_threads=2, seed=1)
    pipe.build()
    src = CyclingSource(photos[:96], b)
    gpu_views = []
    for step in range(3):
        q, k, ids = ad.dali_outputs_to_torch(pipe.run(), "gpu")
        assert q.is_cuda and k.is_cuda and not ids.is_cuda
        assert q.shape == k.shape == (b, 3, size, size) and q.dtype == torch.float32
        src()
        assert ids.tolist() == src.ids_given[step]
        assert not torch.equal(q, k)
        gpu_views += [q.cpu(), k.cpu()]
    g = torch.cat(gpu_views)
    cpu = _cpu_pipe(CyclingSource(photos[:96], b), b, size, "moco_v2", seed=1)
    c = torch.cat([t for _ in range(3) for t in ad.dali_outputs_to_torch(cpu.run(), "cpu")[:2]])
    assert (g.mean(dim=(0, 2, 3)) - c.mean(dim=(0, 2, 3))).abs().max() < 0.3
    assert (g.std(dim=(0, 2, 3)) - c.std(dim=(0, 2, 3))).abs().max() < 0.2
    # CPU tensors requested from a GPU pipeline
    q, k, ids = ad.dali_outputs_to_torch(pipe.run(), "cpu")
    assert not q.is_cuda and q.shape == (b, 3, size, size)


def test_blur_is_the_reference_at_224_and_scaled_with_the_crop():
    from mocostream.pipeline import augment_dali as ad
    from mocostream.pipeline.augment_reference import GaussianBlur, blur_sigma_range, reference_transform

    assert blur_sigma_range(224) == (0.1, 2.0)
    lo, hi = blur_sigma_range(32)
    assert abs(lo - 0.1 / 7) < 1e-9 and abs(hi - 2.0 / 7) < 1e-9
    sigma = aug_params.AugParams("moco_v2", 2000, seed=0, size=32).draw()["sigma"]
    assert lo <= sigma.min() < 1.05 * lo and 0.95 * hi < sigma.max() <= hi
    blurs = [t.transforms[0] for t in reference_transform("moco_v2", 32).transforms
             if type(t).__name__ == "RandomApply" and isinstance(t.transforms[0], GaussianBlur)]
    assert len(blurs) == 1 and tuple(blurs[0].sigma) == (lo, hi)
