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

from mocostream.shards import create_shards
from mocostream.pipeline.dali_check import checker, dali_problem
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
