"""Files PIL decodes but DALI's decoder rejects never reach a shard with their original bytes.

Crafted from a real photo: each one decodes end to end in PIL and fails `fn.decoders.image` (CPU) in DALI.
"""
from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mocostream.pipeline.dali_check import checker, dali_problem
from mocostream.pipeline.image_check import check_image, jpeg_segments_ok, trusted
from mocostream.shards import create_shards
from mocostream.shards.validate import Options, normalise
from mocostream.shards.verify import tar_samples

pytestmark = pytest.mark.filterwarnings("ignore:Invalid APNG")  # PIL's note on apng_zero_frames.png


def _chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) if crc is None else crc)


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    i, out = 8, []
    while i < len(png):
        n = struct.unpack(">I", png[i:i + 4])[0]
        out.append((png[i + 4:i + 8], png[i + 8:i + 8 + n]))
        i += 12 + n
    return out


def crafted(photo: bytes) -> dict[str, bytes]:
    """Upright 8-bit RGB PNG/JPEG (so nothing else would make the tool re-encode them), each with one
    structure PIL tolerates and nvImageCodec does not."""
    img = Image.open(io.BytesIO(photo)).convert("RGB").resize((96, 72))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    png = buf.getvalue()
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    sig, chunks = png[:8], _chunks(png)
    ihdr, body, iend = _chunk(*chunks[0]), b"".join(_chunk(k, d) for k, d in chunks[1:-1]), _chunk(*chunks[-1])
    bad_crc = b"".join(_chunk(k, d, zlib.crc32(k + d) ^ 1) if k == b"IDAT" else _chunk(k, d) for k, d in chunks)
    return {
        "unknown_critical_chunk.png": sig + ihdr + _chunk(b"ZZZZ", b"x") + body + iend,  # PIL skips any chunk
        "bad_idat_crc.png": sig + bad_crc,                                               # PIL skips IDAT CRCs
        "apng_zero_frames.png": sig + ihdr + _chunk(b"acTL", bytes(8)) + body + iend,     # num_frames 0
        "no_iend.png": sig + ihdr + body,
        # APP1 declares 8 bytes but 30 follow: libjpeg (PIL) skips the extra bytes, nvImageCodec's parser fails
        "app1_length_short.jpg": jpeg[:2] + b"\xff\xe1\x00\x08Exif\x00\x00" + b"\x01" * 24 + jpeg[2:],
    }


def dali_decodes(data: bytes) -> bool:
    """Does DALI's fn.decoders.image (CPU) decode `data`? (A fresh pipeline: an error invalidates it.)"""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def decode():
        return fn.decoders.image(fn.external_source(source=lambda: [np.frombuffer(data, np.uint8)], batch=True),
                                 device="cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    try:
        pipe.run()
        return True
    except RuntimeError:
        return False


def dali_read_all(out: Path) -> list[tuple[int, int, int]]:
    """Every sample of a tar set through DALI's webdataset reader (with the index files) and decoder."""
    from nvidia.dali import Pipeline, fn, types
    m = json.loads((out / "manifest.json").read_text())
    tars = [str(out / s["name"]) for s in m["shards"]]
    pipe = Pipeline(batch_size=8, num_threads=1, device_id=None)
    with pipe:
        img = fn.readers.webdataset(paths=tars, index_paths=[str(out / s["index"]) for s in m["shards"]],
                                    ext=["jpg;png;webp"], missing_component_behavior="error", pad_last_batch=True,
                                    name="r")
        pipe.set_outputs(fn.decoders.image(img, device="cpu", output_type=types.RGB))
    pipe.build()
    n, shapes = pipe.epoch_size("r"), []
    while len(shapes) < n:
        (images,) = pipe.run()
        shapes += [tuple(np.array(images.at(i)).shape) for i in range(len(images))]
    return shapes[:n]


@pytest.fixture(scope="module")
def folder(imagenette_small, tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """4 real photos + the crafted files."""
    root = tmp_path_factory.mktemp("dali_src")
    photos = sorted(p for p in imagenette_small.rglob("*.JPEG"))[:4]
    for p in photos:
        shutil.copy(p, root / p.name)
    files = crafted(photos[0].read_bytes())
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root, files


def test_crafted_files_decode_in_pil_but_not_in_dali(folder):
    _, files = folder
    assert checker().startswith("nvimgcodec ")
    for name, data in files.items():
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # PIL: fine, end to end
            assert im.mode == "RGB" and not getattr(im, "is_animated", False), name
            fmt = im.format
        assert not dali_decodes(data), name
        assert dali_problem(data, fmt), name


def test_real_photos_pass_the_dali_check(webphotos):
    photos = sorted(webphotos.iterdir())[:50]
    assert all(dali_problem(p.read_bytes(), "JPEG") is None for p in photos)


def test_auto_reencodes_what_only_pil_reads(folder, tmp_path):
    src, files = folder
    r = create_shards([str(src)], str(tmp_path), samples_per_shard=100, dedup="none", workers=2, progress=False)
    assert r.written == 4 + len(files) and r.rejected == []
    stored = {json.loads(parts["json"])["source"]: parts for _, parts in tar_samples((tmp_path / r.shards[0]["name"]).read_bytes())}
    for name, data in files.items():
        parts = stored[str(src / name)]
        assert set(parts) == {"jpg", "json"} and parts["jpg"] != data, name  # re-encoded, not kept
        assert dali_decodes(parts["jpg"]), name
    for p in src.glob("*.JPEG"):
        assert stored[str(p)]["jpg"] == p.read_bytes()  # real photos still kept byte-for-byte
    shapes = dali_read_all(tmp_path)  # the whole set goes through DALI in batches: nothing fails it
    assert len(shapes) == r.written and all(s[2] == 3 for s in shapes)


def test_never_rejects_what_only_pil_reads(folder, tmp_path):
    src, files = folder
    r = create_shards([str(src)], str(tmp_path), reencode="never", dedup="none", workers=1, progress=False)
    assert r.written == 4
    assert sorted(Path(s).name for s, _, _ in r.rejected) == sorted(files)
    assert {reason for _, reason, _ in r.rejected} == {"needs_reencode"}
    assert all("DALI's decoder" in detail for _, _, detail in r.rejected)
    assert len(dali_read_all(tmp_path)) == 4


def jpeg_rule_cases(photo: bytes, mpo: bytes) -> dict[str, bytes]:
    """Where the shard tool's and the loader's two former copies of the JPEG marker walk differed."""
    app0_end = 4 + int.from_bytes(photo[4:6], "big")
    return {
        "length0.jpg": photo[:2] + b"\xff\xfe\x00\x00" + photo[2:],  # a COM segment whose length is under 2
        "length1.jpg": photo[:2] + b"\xff\xfe\x00\x01" + photo[2:],
        "second_soi.jpg": photo[:2] + b"\xff\xd8" + photo[2:],  # the loader's walk skipped a second SOI
        "soi_after_app0.jpg": photo[:app0_end] + b"\xff\xd8" + photo[app0_end:],
        "soi_with_length.jpg": photo[:2] + b"\xff\xd8\x00\x04\x00\x00" + photo[2:],  # the shard tool's read a length
        "length0.mpo": mpo[:2] + b"\xff\xfe\x00\x00" + mpo[2:],  # the shard tool did not walk MPO
    }


def test_jpeg_rules_give_the_same_verdict_in_the_shard_tool_and_the_loader(webphotos, messy_images, tmp_path):
    """One rule set: bytes `shards create` keeps as they are pass the loader's pre-flight check, and bytes
    that check refuses are never kept; a set created with these files carries a stamp the loader trusts."""
    photo = sorted(webphotos.iterdir())[0].read_bytes()
    assert photo[2:4] == b"\xff\xe0"  # APP0 right after SOI
    mpo = (messy_images / "pillow" / "frozenpond.mpo").read_bytes()
    cases = jpeg_rule_cases(photo, mpo)
    src = tmp_path / "src"
    src.mkdir()
    for name, data in {**cases, "photo.jpg": photo, "good.mpo": mpo}.items():
        (src / name).write_bytes(data)
    assert not any(jpeg_segments_ok(data) for data in cases.values())
    assert jpeg_segments_ok(photo) and jpeg_segments_ok(mpo)
    # the loader's path: every case refused, the intact files accepted
    assert {n: check_image(d) for n, d in cases.items()} == dict.fromkeys(cases, "corrupt")
    assert check_image(photo) is None and check_image(mpo) is None
    # the shard tool, never re-encoding: keeps exactly what the loader accepts (MPO aside: always re-encoded)
    r = create_shards([str(src)], str(tmp_path / "never"), reencode="never", dedup="none", workers=1, progress=False)
    refused = {Path(s).name: detail for s, _, detail in r.rejected}
    assert set(refused) == {*cases, "good.mpo"} and r.written == 1
    assert "broken JPEG marker segments" in refused["length0.mpo"]
    assert "broken JPEG marker segments" not in refused["good.mpo"]
    # re-encoding: what it stores passes the loader's check, and the set is trusted to need no check
    out = tmp_path / "auto"
    r = create_shards([str(src)], str(out), dedup="none", workers=1, progress=False)
    stored = {Path(json.loads(p["json"])["source"]).name: p["jpg"]
              for _, p in tar_samples((out / r.shards[0]["name"]).read_bytes())}
    assert stored["photo.jpg"] == photo and {"good.mpo", "length0.jpg", "length0.mpo"} <= set(stored)
    assert all(check_image(data) is None for data in stored.values())
    assert trusted(json.loads((out / "manifest.json").read_text())["options"]["validated_by"])


def test_bytes_the_shard_tool_keeps_pass_the_loader_check(webphotos):
    """Damaged JPEG headers (random bytes over a real photo's marker segments, half of them on the markers
    and lengths): what the shard tool keeps byte-for-byte the loader accepts; what it writes at all too."""
    photo = sorted(webphotos.iterdir())[1].read_bytes()
    spots, i = [], 2
    while photo[i + 1] != 0xDA:  # up to SOS
        spots += range(i, i + 4)  # a marker and its length field
        i += 2 + int.from_bytes(photo[i + 2:i + 4], "big")
    rng = np.random.default_rng(25)
    verdicts, kept = [], 0
    for n in range(160):
        data = bytearray(photo)
        where = rng.choice(spots, size=2) if n % 2 else rng.integers(2, i + 4, size=3)
        for at in where:
            data[at] = int(rng.choice([0x00, 0x01, 0xD8, 0xFF, int(rng.integers(0, 256))]))
        data = bytes(data)
        verdicts.append(check_image(data))
        for options in (Options(dedup="none"), Options(dedup="none", reencode="never")):
            result = normalise(data, options=options)
            if getattr(result, "data", None) == data:
                assert verdicts[-1] is None, (verdicts[-1], data[:i + 4].hex())
                kept += 1
            elif hasattr(result, "data"):
                assert check_image(result.data) is None
    assert kept and {None, "corrupt"} <= set(verdicts)  # both verdicts were exercised
