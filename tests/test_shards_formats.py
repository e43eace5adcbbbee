"""`--format tar,parquet`: both formats from one run, locally and on SeaweedFS S3. The same samples, keys and
order in each (shard N of each holds the same samples), read back by webdataset's WebDataset, DALI's
fn.readers.webdataset (with the index files) and pyarrow; one manifest per format; verify, inspect, resume,
--part + merge, the CLI, and what the trainer's data spec resolves to."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import REPO, assert_same_shard_sets
from mocostream.shards import create_shards, inspect, merge, verify
from mocostream.shards.verify import tar_samples

SPS = 50  # 120 photos: shards of 50, 50, 20
BOTH = {"tar": "manifest.json", "parquet": "manifest-parquet.json"}


def make(sources, out, **kw):
    kw.setdefault("progress", False)
    return create_shards([str(s) for s in sources], str(out), **kw)


def load(out, name="manifest.json") -> dict:
    return json.loads((Path(out) / name).read_text())


def webdataset_rows(urls: list[str]) -> list[tuple[str, bytes, dict]]:
    """(key, image bytes, json meta) of every sample, read by webdataset (raw bytes: nothing decoded or unpickled)."""
    import webdataset as wds
    return [(s["__key__"], s["jpg"], json.loads(s["json"])) for s in wds.WebDataset(urls, shardshuffle=False)]


def pyarrow_rows(tables) -> list[tuple[str, bytes, dict]]:
    rows = []
    for t in tables:
        for r in t.to_pylist():
            rows.append((r.pop("key"), r.pop("image"), r))
    return rows


def dali_rows(tars: list[str], idxs: list[str]) -> list[tuple[str, tuple]]:
    """(key from the json member, decoded shape) of every sample via DALI's webdataset reader + decoder."""
    from nvidia.dali import Pipeline, fn, types
    pipe = Pipeline(batch_size=16, num_threads=1, device_id=None)
    with pipe:
        img, meta = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg", "json"],
                                          missing_component_behavior="error", pad_last_batch=True, name="r")
        pipe.set_outputs(fn.decoders.image(img, device="cpu", output_type=types.RGB), meta)
    pipe.build()
    n, out = pipe.epoch_size("r"), []
    while len(out) < n:
        images, metas = pipe.run()
        out += [(json.loads(bytes(np.array(metas.at(i))))["key"], tuple(np.array(images.at(i)).shape))
                for i in range(len(metas))]
    return out[:n]


def same_rows(tar_rows, parquet_rows) -> None:
    """The two formats hold the same samples: keys, order, image bytes and metadata."""
    assert [k for k, _, _ in tar_rows] == [k for k, _, _ in parquet_rows]
    for (key, img_t, meta), (_, img_p, row) in zip(tar_rows, parquet_rows):
        assert img_t == img_p, key
        assert (meta["key"], meta["label"], meta["source"], meta["width"], meta["height"], meta["format"]) == \
               (key, row["label"], row["source"], row["width"], row["height"], row["ext"])


@pytest.fixture(scope="module")
def dual(imagenette_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("dual") / "shards"
    return out, make([imagenette_small], out, fmt="tar,parquet", samples_per_shard=SPS, workers=2)


# ---------------------------------------------------------------- local

def test_one_manifest_per_format_same_shards(dual):
    out, r = dual
    m, mp = load(out), load(out, "manifest-parquet.json")
    assert (m["format"], mp["format"]) == ("tar", "parquet") and m["formats"] == mp["formats"] == BOTH
    assert [s["name"] for s in m["shards"]] == [f"shard-00000{i}.tar" for i in range(3)]
    assert [s["name"] for s in mp["shards"]] == [f"shard-00000{i}.parquet" for i in range(3)]
    assert [s["samples"] for s in m["shards"]] == [s["samples"] for s in mp["shards"]] == [50, 50, 20]
    assert [s["stats"] for s in m["shards"]] == [s["stats"] for s in mp["shards"]]  # one checkpoint per shard N
    assert "index" not in mp["shards"][0] and m["options"] == mp["options"] and m["options"]["format"] == "tar,parquet"
    for man in (m, mp):
        assert man["total_samples"] == 120 and man["inputs"] == 120
        for s in man["shards"]:
            data = (out / s["name"]).read_bytes()
            assert (s["bytes"], s["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert r.shards == m["shards"] and r.by_format == {"tar": m["shards"], "parquet": mp["shards"]}
    stats = load(out, m["shards"][0]["stats"])
    assert stats["shard"] == m["shards"][0] and stats["also"] == [mp["shards"][0]]
    report = load(out, "report.json")
    assert report["formats"] == {"tar": {"shards": 3, "bytes_out": m["total_bytes"]},
                                 "parquet": {"shards": 3, "bytes_out": mp["total_bytes"]}}
    assert report["dali_check"].startswith("nvimgcodec")
    expected = ["manifest.json", "manifest.parquet", "manifest-parquet.json", "manifest-parquet.parquet", "rejects.jsonl",
                "report.json"] + \
        [s[k] for s in m["shards"] for k in ("name", "index", "stats")] + [s["name"] for s in mp["shards"]]
    assert sorted(os.listdir(out)) == sorted(expected)  # nothing else, no temp files


def test_both_formats_hold_the_same_samples_for_webdataset_pyarrow_and_dali(dual, imagenette_small):
    out, _ = dual
    m, mp = load(out), load(out, "manifest-parquet.json")
    tars = [str(out / s["name"]) for s in m["shards"]]
    tar_rows = webdataset_rows(tars)
    parquet_rows = pyarrow_rows(pq.read_table(out / s["name"]) for s in mp["shards"])
    assert len(tar_rows) == 120
    same_rows(tar_rows, parquet_rows)
    # shard by shard too: shard N of each format holds the same samples
    for st, sp in zip(m["shards"], mp["shards"]):
        assert [k for k, _ in tar_samples((out / st["name"]).read_bytes())] == \
               pq.read_table(out / sp["name"], columns=["key"]).column("key").to_pylist()
    assert [meta["source"] for _, _, meta in tar_rows] == sorted(str(p) for p in imagenette_small.rglob("*") if p.is_file())
    dali = dali_rows(tars, [str(out / s["index"]) for s in m["shards"]])
    assert [k for k, _ in dali] == [k for k, _, _ in parquet_rows]
    assert all(shape == (row["height"], row["width"], 3) for (_, shape), (_, _, row) in zip(dali, parquet_rows))


def test_each_format_is_byte_identical_to_its_single_format_run(dual, imagenette_small, tmp_path):
    out, _ = dual
    for fmt, name in BOTH.items():
        single = make([imagenette_small], tmp_path / fmt, fmt=fmt, samples_per_shard=SPS, workers=1)
        assert [(s["name"], s["sha256"]) for s in single.shards] == [(s["name"], s["sha256"]) for s in load(out, name)["shards"]]
        assert "formats" not in load(tmp_path / fmt)  # a single-format manifest is unchanged


def test_verify_checks_both_formats_and_inspect_lists_them(dual, tmp_path):
    out, _ = dual
    assert verify(str(out)) == []
    info = inspect(str(out))
    assert info["outputs"] == {"tar": {"manifest": "manifest.json", "shards": 3, "bytes": load(out)["total_bytes"]},
                               "parquet": {"manifest": "manifest-parquet.json", "shards": 3,
                                           "bytes": load(out, "manifest-parquet.json")["total_bytes"]}}
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    p = bad / "shard-000001.parquet"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    problems = verify(str(bad), decode=False)
    assert problems and all(x.startswith("shard-000001.parquet") for x in problems), problems
    (bad / "manifest-parquet.json").unlink()
    assert verify(str(bad), decode=False) == ["manifest-parquet.json: missing (manifest.json lists it for parquet)"]


def test_resume_redoes_a_shard_missing_in_one_format(dual, imagenette_small, tmp_path):
    out, _ = dual
    again = tmp_path / "again"
    shutil.copytree(out, again)
    for name in ("manifest.json", "manifest-parquet.json", "shard-000002_stats.json", "shard-000001.parquet"):
        (again / name).unlink()  # as if killed while shard 1's parquet was still a temp file
    r = make([imagenette_small], again, fmt="tar,parquet", samples_per_shard=SPS, workers=1)
    assert r.resumed_from == 50 and r.report["processed_this_run"] == 70
    assert_same_shard_sets(again, out)
    # the class names of the resumed shards come from their stats files
    assert load(again)["classes"] == load(out)["classes"] == sorted(p.name for p in imagenette_small.iterdir())


def test_trainer_data_spec_reads_one_format(dual):
    """`mocostream train --data DEST` (or DEST/manifest.json) reads the primary format only, never both;
    DEST/manifest-parquet.json reads the other one. Same samples either way."""
    from mocostream.pipeline.readers import read_samples
    from mocostream.pipeline.filesystems import Storage
    from mocostream.pipeline.sources import resolve_shards
    out, _ = dual
    storage = Storage()
    tar_shards = resolve_shards(str(out), storage=storage)
    assert resolve_shards(str(out / "manifest.json"), storage=storage) == tar_shards
    assert [(s.format, s.samples) for s in tar_shards] == [("tar", 50), ("tar", 50), ("tar", 20)]
    parquet_shards = resolve_shards(str(out / "manifest-parquet.json"), storage=storage)
    assert [(s.format, s.samples) for s in parquet_shards] == [("parquet", 50), ("parquet", 50), ("parquet", 20)]

    def samples(shards):
        return [(s.key, s.data) for sh in shards for s in read_samples(sh, storage.read_bytes(sh.url))]
    assert samples(tar_shards) == samples(parquet_shards)
    # the trainer's loader on DEST: one epoch delivers every sample once (not once per format)
    from mocostream.pipeline.loader import LoaderConfig, TwoViewLoader
    loader = TwoViewLoader(LoaderConfig(data=str(out), batch_size=8, image_size=32, backend="dali", workers=1,
                                        epochs=1))
    keys = [k for b in loader for k in b.keys]
    assert len(keys) == len(set(keys)) and len(keys) + sum(loader.skipped.values()) == 120


def test_parts_in_both_formats_merge_into_two_manifests(imagenette_small, tmp_path):
    out = tmp_path / "parts"
    for i in range(2):
        make([imagenette_small], out, fmt="tar,parquet", part=f"{i}/2", samples_per_shard=SPS, workers=1)
    merge(str(out))
    m, mp = load(out), load(out, "manifest-parquet.json")
    assert m["formats"] == mp["formats"] == BOTH and m["total_samples"] == mp["total_samples"] == 120
    assert [s["name"] for s in mp["shards"]] == [f"part-0000{i}-of-00002/shard-00000{j}.parquet"
                                                 for i in range(2) for j in range(2)]
    assert [s["samples"] for s in m["shards"]] == [s["samples"] for s in mp["shards"]] == [50, 10, 50, 10]
    assert verify(str(out), decode=False) == []


@pytest.mark.slow
def test_cli_format_list(imagenette_small, tmp_path):
    run = [sys.executable, "-m", "mocostream.ops.cli", "shards", "create", str(imagenette_small), "--out", str(tmp_path / "o"),
           "--samples-per-shard", "100", "--workers", "1", "--json"]
    p = subprocess.run(run + ["--format", "parquet,tar"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["formats"] == {"parquet": {"shards": 2, "bytes_out": load(tmp_path / "o")["total_bytes"]},
                                               "tar": {"shards": 2, "bytes_out": load(tmp_path / "o", "manifest-tar.json")["total_bytes"]}}
    assert load(tmp_path / "o")["format"] == "parquet"  # the first one listed is manifest.json
    for bad in ("zip", "tar,tar", "tar,"):
        p = subprocess.run(run + ["--format", bad], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("mocostream: error: --format"), \
            p.stderr


# ---------------------------------------------------------------- S3

@pytest.mark.slow
def test_both_formats_on_s3(s3_env, dual, imagenette_small, tmp_path, monkeypatch):
    import importlib
    gopen = importlib.import_module("webdataset.gopen")  # the module (the package re-exports a function by that name)
    out, _ = dual
    bucket = s3_env.make_bucket("shards-dual")
    fs = s3_env.filesystem()
    url = f"s3://{bucket}/both"
    r = make([imagenette_small], url, fmt="tar,parquet", samples_per_shard=SPS, workers=2)
    # the same bytes as the local run, in both formats
    for name in BOTH.values():
        remote = json.loads(fs.cat_file(f"{bucket}/both/{name}"))
        assert [(s["name"], s["sha256"]) for s in remote["shards"]] == [(s["name"], s["sha256"]) for s in load(out, name)["shards"]]
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/both")) == sorted(os.listdir(out))  # nothing partial
    assert verify(url) == []
    m, mp = r.by_format["tar"], r.by_format["parquet"]
    # read from S3: webdataset (through an fsspec opener), DALI (s3:// paths + the index files), pyarrow
    monkeypatch.setitem(gopen.gopen_schemes, "s3", lambda u, mode="rb", bufsize=8192, **kw: fs.open(u[5:], mode))
    tars = [f"{url}/{s['name']}" for s in m]
    tar_rows = webdataset_rows(tars)
    parquet_rows = pyarrow_rows(pq.read_table(io.BytesIO(fs.cat_file(f"{bucket}/both/{s['name']}"))) for s in mp)
    same_rows(tar_rows, parquet_rows)
    for s in m:
        (tmp_path / s["index"]).write_bytes(fs.cat_file(f"{bucket}/both/{s['index']}"))
    dali = dali_rows(tars, [str(tmp_path / s["index"]) for s in m])
    assert [k for k, _ in dali] == [k for k, _, _ in tar_rows] and len(dali) == 120
    # resume on S3: drop both manifests and the last checkpoint -> only the last shard is redone
    for name in list(BOTH.values()) + [m[-1]["stats"]]:
        fs.rm(f"{bucket}/both/{name}")
    again = make([imagenette_small], url, fmt="tar,parquet", samples_per_shard=SPS, workers=1)
    assert again.resumed_from == 100 and again.by_format == r.by_format
