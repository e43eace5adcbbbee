"""Shard creation tool: real images in, webdataset/parquet shards out, read back by webdataset, DALI, pyarrow."""
from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import assert_same_shard_sets
from mocostream.shards import REASONS, ShardError, create_shards
from mocostream.shards.keys import MAX_KEY_LEN, assign_keys, natural_key

SPS = 50  # samples per shard for the 120-image set: 50 + 50 + 20


# ---------------------------------------------------------------- helpers

def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def all_files(root) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def load_manifest(out) -> dict:
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def tar_samples(path) -> list[dict]:
    """Samples of one tar in member order: {"key", ext: bytes, "json": dict, "_members": [TarInfo]}."""
    samples: list[dict] = []
    with tarfile.open(path) as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            if not samples or samples[-1]["key"] != key:
                samples.append({"key": key, "_members": []})
            samples[-1]["_members"].append(m)
            data = tf.extractfile(m).read()
            samples[-1][ext] = json.loads(data) if ext == "json" else data
    return samples


def assert_kept_or_converted(stored: bytes, source) -> bool:
    """Upright RGB JPEGs are kept byte-for-byte; others (ImageNet has greyscale ones) become RGB JPEG."""
    with open(source, "rb") as f:
        original = f.read()
    with Image.open(io.BytesIO(original)) as im:
        src_mode = im.mode
    if src_mode == "RGB":
        assert stored == original, source
        return True
    with Image.open(io.BytesIO(stored)) as im:
        assert (im.format, im.mode) == ("JPEG", "RGB"), source
    return False


def shard_paths(out, manifest, suffix=".tar"):
    return [os.path.join(out, s["name"]) for s in manifest["shards"] if s["name"].endswith(suffix)]


def make(sources, out, **kw):
    kw.setdefault("progress", False)
    return create_shards([str(s) for s in sources], str(out), **kw)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def imagenette_tar(imagenette_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("imagenette_tar") / "shards"
    report = make([imagenette_small], out, samples_per_shard=SPS)
    return out, report


@pytest.fixture(scope="module")
def messy_tar(messy_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("messy_tar")
    # dedup off here: these tests look at how each file is normalised (test_shards_more.py covers dedup)
    report = make([messy_images], out, samples_per_shard=200, dedup="none", workers=2)
    return out, report


# ---------------------------------------------------------------- keys

def test_keys_are_stable_dot_free_and_collision_free():
    assert natural_key("train/n01440764/ILSVRC2012_val_00000293.JPEG") == "train_n01440764_ILSVRC2012_val_00000293"
    assert natural_key("a/b.c d.e.png") == "a_b_c_d_e"
    assert natural_key(".gitignore") == "_gitignore"
    paths = ["a b.jpg", "a_b.jpg", "x.jpg", "x.png", "x_1.jpg"]
    keys = assign_keys(paths)
    # the first keeps its natural key; a suffix never steals another file's natural key (x_1)
    assert keys == ["a_b", "a_b_1", "x", "x_2", "x_1"]
    assert assign_keys(paths) == keys
    long = [f"{'d' * 80}/{'f' * 60}{i}.jpg" for i in range(3)]
    lk = assign_keys(long)
    assert len(set(lk)) == 3 and all(len(k) <= MAX_KEY_LEN and "." not in k for k in lk)


# ---------------------------------------------------------------- tar from real photos

def test_tar_manifest_matches_files(imagenette_tar, imagenette_small):
    out, report = imagenette_tar
    n = len(all_files(imagenette_small))
    assert n == 120
    m = load_manifest(out)
    assert m["format_version"] == 1 and m["format"] == "tar" and m["created_by"] == "mocostream"
    assert m["options"]["samples_per_shard"] == SPS and m["options"]["prefix"] == "shard"
    assert [s["name"] for s in m["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s["samples"] for s in m["shards"]] == [50, 50, 20]
    assert m["total_samples"] == 120 and m["rejected"] == 0
    for s in m["shards"]:
        data = (out / s["name"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == sha256(data)
        assert s["index"] == s["name"].replace(".tar", ".idx") and (out / s["index"]).exists()
        assert len(tar_samples(out / s["name"])) == s["samples"]
    assert m["total_bytes"] == sum(s["bytes"] for s in m["shards"])
    assert (out / "rejects.jsonl").read_text() == ""
    # nothing else in DEST: no temp files left behind
    assert sorted(os.listdir(out)) == sorted(
        ["manifest.json", "manifest.parquet", "rejects.jsonl", "report.json"] + [s["name"] for s in m["shards"]]
        + [s["index"] for s in m["shards"]] + [s["stats"] for s in m["shards"]])
    # the report says the same as the manifest
    assert report.written == 120 and report.inputs == 120 and report.rejected == []
    assert report.shards == m["shards"] and report.seconds > 0
    assert report.manifest_url.endswith("manifest.json")


def test_tar_samples_headers_labels_and_bytes(imagenette_tar, imagenette_small):
    out, _ = imagenette_tar
    m = load_manifest(out)
    classes = sorted(os.listdir(imagenette_small))
    seen, kept = [], []
    for path in shard_paths(out, m):
        for s in tar_samples(path):
            assert [i.name for i in s["_members"]] == [f"{s['key']}.jpg", f"{s['key']}.json"]
            for info in s["_members"]:  # deterministic headers
                assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (0, 0, 0, "", "", 0o644)
            meta = s["json"]
            assert set(meta) == {"key", "source", "label", "width", "height", "format"}
            assert meta["key"] == s["key"] and "." not in s["key"] and meta["format"] == "jpg"
            # label = class folder; key = relative path without extension
            rel = os.path.relpath(meta["source"], imagenette_small)
            assert meta["label"] == os.path.dirname(rel) and meta["label"] in classes
            assert s["key"] == rel.rsplit(".", 1)[0].replace("/", "_")
            if assert_kept_or_converted(s["jpg"], meta["source"]):
                kept.append(s["key"])
            with Image.open(io.BytesIO(s["jpg"])) as im:
                assert im.size == (meta["width"], meta["height"])
            seen.append(meta["source"])
    assert seen == all_files(imagenette_small)  # every input once, in sorted order
    assert len({os.path.basename(os.path.dirname(p)) for p in seen}) == 10
    assert len(kept) > 100  # most ImageNet photos are RGB and stored untouched


def test_tar_read_by_webdataset(imagenette_tar):
    import webdataset as wds
    out, _ = imagenette_tar
    m = load_manifest(out)
    ds = wds.WebDataset(shard_paths(out, m), shardshuffle=False)  # raw bytes: no decoders, nothing unpickled
    samples = list(ds)
    assert len(samples) == 120
    keys = [s["__key__"] for s in samples]
    assert keys == [json.loads(s["json"])["key"] for s in samples]
    assert keys == [s["key"] for p in shard_paths(out, m) for s in tar_samples(p)]
    assert all(set(s) >= {"jpg", "json"} for s in samples)


def test_idx_is_what_wds2idx_writes(imagenette_tar, tmp_path):
    from wds2idx import IndexCreator  # DALI's own tool
    out, _ = imagenette_tar
    for s in load_manifest(out)["shards"]:
        ref = tmp_path / s["index"]
        with IndexCreator(str(out / s["name"]), str(ref), verbose=False) as ic:
            ic.create_index()
        ours = (out / s["index"]).read_text()
        assert ours == ref.read_text()
        assert ours.splitlines()[0] == f"v1.2 {s['samples']}"


def _dali_read(tars, idxs, ext, batch_size=32):
    """Every sample of `tars` through DALI's webdataset reader + CPU image decoder: (shapes, metas)."""
    from nvidia.dali import Pipeline, fn, types
    pipe = Pipeline(batch_size=batch_size, num_threads=1, device_id=None)
    with pipe:
        img, meta = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=[ext, "json"],
                                          missing_component_behavior="error", pad_last_batch=True, name="r")
        pipe.set_outputs(fn.decoders.image(img, device="cpu", output_type=types.RGB), meta)
    pipe.build()
    n = pipe.epoch_size("r")
    shapes, metas = [], []
    while len(metas) < n:
        images, raw = pipe.run()
        for i in range(len(raw)):
            shapes.append(tuple(np.array(images.at(i)).shape))
            metas.append(json.loads(bytes(np.array(raw.at(i)))))
    return n, shapes[:n], metas[:n]


def test_tar_read_by_dali(imagenette_tar):
    out, _ = imagenette_tar
    m = load_manifest(out)
    tars = shard_paths(out, m)
    n, shapes, metas = _dali_read(tars, [t.replace(".tar", ".idx") for t in tars], "jpg")
    assert n == 120
    assert len({mt["key"] for mt in metas}) == 120
    for shape, mt in zip(shapes, metas):
        assert shape == (mt["height"], mt["width"], 3)
    assert shapes[0][2] == 3 and min(shapes[0][:2]) >= 8


# ---------------------------------------------------------------- parquet

def test_parquet_columns_counts_labels(imagenette_small, tmp_path):
    report = make([imagenette_small], tmp_path, fmt="parquet", samples_per_shard=100)
    m = load_manifest(tmp_path)
    assert m["format"] == "parquet" and [s["samples"] for s in m["shards"]] == [100, 20]
    assert [s["name"] for s in m["shards"]] == ["shard-000000.parquet", "shard-000001.parquet"]
    assert "index" not in m["shards"][0] and not glob.glob(str(tmp_path / "*.idx"))
    rows = []
    for s in m["shards"]:
        path = tmp_path / s["name"]
        data = path.read_bytes()
        assert (s["bytes"], s["sha256"]) == (len(data), sha256(data))
        t = pq.read_table(path)
        assert t.num_rows == s["samples"]
        assert str(t.schema.field("key").type) == "string" and str(t.schema.field("image").type) == "binary"
        assert str(t.schema.field("width").type) == "int32" and str(t.schema.field("height").type) == "int32"
        assert t.column_names == ["key", "image", "ext", "label", "source", "width", "height"]
        rows += t.to_pylist()
    assert report.written == len(rows) == 120
    for r in rows:
        assert_kept_or_converted(r["image"], r["source"])
        assert r["ext"] == "jpg" and r["label"] == os.path.basename(os.path.dirname(r["source"]))
        with Image.open(io.BytesIO(r["image"])) as im:
            assert im.size == (r["width"], r["height"])
    assert [r["source"] for r in rows] == all_files(imagenette_small)


@pytest.mark.slow
def test_parquet_row_groups_of_256(webphotos, tmp_path):
    make([webphotos], tmp_path, fmt="parquet", samples_per_shard=400)
    m = load_manifest(tmp_path)
    assert m["total_samples"] + m["rejected"] == len(all_files(webphotos)) == 500
    first = pq.ParquetFile(tmp_path / m["shards"][0]["name"])
    assert first.metadata.num_rows == 400
    assert [first.metadata.row_group(i).num_rows for i in range(first.num_row_groups)] == [256, 144]


# ---------------------------------------------------------------- determinism

@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_two_runs_give_identical_shards(imagenette_small, tmp_path, fmt):
    a, b = tmp_path / "a", tmp_path / "b"
    make([imagenette_small], a, fmt=fmt, samples_per_shard=SPS)
    make([imagenette_small], b, fmt=fmt, samples_per_shard=SPS)
    assert_same_shard_sets(a, b)


# ---------------------------------------------------------------- messy inputs

@pytest.mark.slow
def test_messy_every_input_written_or_rejected(messy_tar, messy_images):
    out, report = messy_tar
    inputs = all_files(messy_images)
    assert report.inputs == len(inputs)
    assert report.written + len(report.rejected) == len(inputs)
    m = load_manifest(out)
    assert m["total_samples"] == report.written and m["rejected"] == len(report.rejected)
    assert sum(m["rejected_by_reason"].values()) == m["rejected"]
    lines = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(x["source"], x["reason"], x["detail"]) for x in lines] == report.rejected
    assert {x["reason"] for x in lines} <= set(REASONS)
    assert all(x["detail"] for x in lines)
    written_sources = [s["json"]["source"] for p in shard_paths(out, m) for s in tar_samples(p)]
    assert sorted(written_sources + [x["source"] for x in lines]) == inputs  # each input exactly once
    reasons = {x["reason"] for x in lines}
    assert {"truncated", "decompression_bomb", "not_an_image", "too_small", "unsupported"} <= reasons
    by_name = {os.path.relpath(x["source"], messy_images): x["reason"] for x in lines}
    assert by_name["pillow/decompression_bomb.gif"] == "decompression_bomb"
    assert by_name["pillow/psd-large-bytecounts.psd"] == "truncated"
    assert by_name["exif-orientation/LICENSE"] == "not_an_image"
    assert report.written > 300  # the corpus is mostly decodable images


@pytest.mark.filterwarnings("ignore:Image appears to be a malformed MPO file")
def test_messy_written_samples_decode_with_pil(messy_tar):
    out, _ = messy_tar
    m = load_manifest(out)
    n = 0
    for path in shard_paths(out, m):
        for s in tar_samples(path):
            meta = s["json"]
            ext = meta["format"]
            assert ext in ("jpg", "png", "webp") and set(s) == {"key", "_members", ext, "json"}
            with Image.open(io.BytesIO(s[ext])) as im:
                im.load()
                assert im.mode == "RGB" and im.size == (meta["width"], meta["height"])
                assert min(im.size) >= 8
                assert {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[im.format] == ext
            n += 1
    assert n == m["total_samples"]


def test_messy_written_samples_decode_with_dali(messy_tar):
    # DALI cannot skip a bad image: everything we keep must get through its decoder
    # (e.g. photoshop-200dpi-broken.jpg decodes in PIL but not in nvImageCodec as-is).
    out, _ = messy_tar
    m = load_manifest(out)
    tars = shard_paths(out, m)
    n, shapes, metas = _dali_read(tars, [t.replace(".tar", ".idx") for t in tars], "jpg;png;webp", batch_size=16)
    assert n == m["total_samples"]
    for shape, mt in zip(shapes, metas):
        assert shape == (mt["height"], mt["width"], 3), mt["key"]


def test_messy_normalisation(messy_tar, messy_images):
    out, _ = messy_tar
    m = load_manifest(out)
    samples = {s["key"]: s for p in shard_paths(out, m) for s in tar_samples(p)}

    def pixels(key):
        s = samples[key]
        return np.asarray(Image.open(io.BytesIO(s[s["json"]["format"]])).convert("RGB"), dtype=np.float32)

    # EXIF orientation applied: all 8 orientations of a photo come out upright and alike
    for kind, size in (("Landscape", (1800, 1200)), ("Portrait", (1200, 1800))):
        ref = pixels(f"exif-orientation_{kind}_1")
        for o in range(1, 9):
            s = samples[f"exif-orientation_{kind}_{o}"]
            assert (s["json"]["width"], s["json"]["height"]) == size
            assert np.abs(pixels(s["key"]) - ref).mean() < 8, (kind, o)
        assert np.abs(ref[::-1] - ref).mean() > 20  # the check above would notice a wrong flip
    # alpha composited on white, re-encoded as JPEG
    src = np.asarray(Image.open(messy_images / "pillow/transparent.webp"))
    assert src.shape[2] == 4 and (src[..., 3] == 0).any()
    assert samples["pillow_transparent"]["json"]["format"] == "jpg"
    assert pixels("pillow_transparent")[src[..., 3] == 0].mean() > 245
    # PIL-tolerated broken JPEG header: re-encoded, not kept byte-for-byte
    broken = samples["pillow_photoshop-200dpi-broken"]
    assert broken["jpg"] != (messy_images / "pillow/photoshop-200dpi-broken.jpg").read_bytes()
    # upright RGB PNG kept as it was (hopper.bmp sorts first and owns the natural key "pillow_hopper")
    by_source = {os.path.relpath(s["json"]["source"], messy_images): s for s in samples.values()}
    png = by_source["pillow/hopper.png"]
    assert png["key"].startswith("pillow_hopper_") and samples["pillow_hopper"]["json"]["source"].endswith(".bmp")
    assert png["json"]["format"] == "png" and png["png"] == (messy_images / "pillow/hopper.png").read_bytes()


# ---------------------------------------------------------------- errors, atomicity, CLI

def test_missing_source_and_bad_options(tmp_path, imagenette_small):
    missing = str(tmp_path / "nope")
    with pytest.raises(ShardError, match=f"source not found: {missing}") as e:
        make([missing], tmp_path / "out")
    assert e.value.user_error is True
    assert not (tmp_path / "out").exists()  # nothing created for a failed call
    with pytest.raises(ShardError, match="format"):
        make([imagenette_small], tmp_path / "o", fmt="zip")
    with pytest.raises(ShardError, match="samples per shard"):
        make([imagenette_small], tmp_path / "o", samples_per_shard=0)
    with pytest.raises(ShardError, match="prefix"):
        make([imagenette_small], tmp_path / "o", prefix="a/b")


def test_rerun_finished_is_noop_other_options_refused(imagenette_tar, imagenette_small):
    out, _ = imagenette_tar
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    again = make([imagenette_small], out, samples_per_shard=SPS)
    assert again.already_complete and again.written == 120 and again.shards == load_manifest(out)["shards"]
    with pytest.raises(ShardError, match="already holds.*samples_per_shard: 50 -> 64"):
        make([imagenette_small], out, samples_per_shard=64)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def _cli():
    from mocostream.ops.cli_shards import add_shards_parser
    parser = argparse.ArgumentParser(prog="mocostream")
    add_shards_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_create_and_errors(imagenette_small, tmp_path, capsys):
    parser = _cli()
    args = parser.parse_args(["shards", "create", str(imagenette_small), "--out", str(tmp_path / "o"),
                              "--format", "parquet", "--samples-per-shard", "64", "--prefix", "in", "--quiet"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "wrote 120 samples into 2 shard(s)" in out and "rejected 0" in out
    assert str(tmp_path / "o" / "manifest.json") in out
    assert [s["name"] for s in load_manifest(tmp_path / "o")["shards"]] == ["in-000000.parquet", "in-000001.parquet"]
    args = parser.parse_args(["shards", "create", str(tmp_path / "missing"), "--out", str(tmp_path / "p")])
    with pytest.raises(ShardError, match="source not found") as e:
        args.func(args)
    assert getattr(e.value, "user_error", False)
    args = parser.parse_args(["shards", "create", str(imagenette_small), "--out", "x", "--format", "zip"])
    with pytest.raises(ShardError, match="--format must be tar, parquet or both") as e:  # one line, exit 2
        args.func(args)


def _create_parser() -> argparse.ArgumentParser:
    from mocostream.ops.cli_shards import add_create_parser
    sub = argparse.ArgumentParser().add_subparsers()
    add_create_parser(sub)
    return sub.choices["create"]


def _plan_from_cli(argv: list[str]):
    from mocostream.ops.cli_shards import HTTP
    from mocostream.ops.options import values_from
    from mocostream.shards.create import make_plan
    from mocostream.shards.download import HttpOptions
    from mocostream.shards.plan import Plan
    args = _create_parser().parse_args(["src", "--out", "dest", *argv])
    return make_plan(values_from(args, Plan), HttpOptions(**values_from(args, HttpOptions, prefix=HTTP)))


def test_create_flags_are_the_plans_and_download_options_fields():
    import dataclasses

    from mocostream.ops.options import flag_of, option_fields
    from mocostream.shards.create import make_plan
    from mocostream.shards.download import HttpOptions
    from mocostream.shards.plan import Plan
    flags = {s for a in _create_parser()._actions for s in a.option_strings}
    for cls in (Plan, HttpOptions):
        assert {flag_of(f) for f in option_fields(cls)} <= flags
    # The two Plan fields without a flag of their own are the download options that change the output.
    assert {f.name for f in dataclasses.fields(Plan)} - {f.name for f in option_fields(Plan)} == \
        {"respect_opt_out", "max_download_bytes"}
    # The fingerprint of existing shard sets hashes these names: renaming one would refuse their reruns.
    assert list(Plan().as_dict()) == [
        "format", "samples_per_shard", "max_shard_bytes", "prefix", "min_size", "max_size", "resize_mode", "quality",
        "reencode", "max_pixels", "dedup", "dedup_threshold", "shuffle", "seed", "part", "url_col", "caption_col",
        "extra_cols", "respect_opt_out", "max_download_bytes"]
    assert _plan_from_cli([]) == make_plan({}, HttpOptions()) == Plan()  # the CLI's defaults are the library's
    given = _plan_from_cli(["--format", "parquet, tar", "--part", "1/3", "--max-shard-bytes", "1KiB", "--shuffle",
                            "--seed", "5", "--dedup", "none", "--ignore-opt-out", "--max-download-bytes", "1MB",
                            "--url-col", "URL", "--min-size", "16"])
    assert given == Plan(format="parquet,tar", part=(1, 3), max_shard_bytes=1024, shuffle=True, seed=5, dedup="none",
                         respect_opt_out=False, max_download_bytes=10**6, url_col="URL", min_size=16)


def test_create_bad_option_values_are_refused_with_their_name(capsys):
    with pytest.raises(ShardError, match="--part must look like i/N"):
        _plan_from_cli(["--part", "3"])
    with pytest.raises(SystemExit) as e:
        _create_parser().parse_args(["src", "--out", "d", "--max-shard-bytes", "lots"])
    assert e.value.code == 2 and "not a size: 'lots'" in capsys.readouterr().err


def test_cli_summary_counts_reasons(messy_tar):
    from mocostream.ops.cli_shards import summary
    _, report = messy_tar
    text = summary(report)
    for reason, count in report.rejected_by_reason().items():
        assert f"{count} {reason}" in text
    assert "rejects.jsonl" in text and "\n" not in text


def test_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        _cli().parse_args(["shards", "create", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--out", "--format", "--samples-per-shard", "--prefix", "--quiet", "SRC", "rejects.jsonl",
                "manifest.json", "AWS_ENDPOINT_URL"):
        assert opt in text
