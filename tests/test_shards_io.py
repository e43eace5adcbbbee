"""Shard tool inputs and outputs for real: tar archives, path/URL lists over a real http server on
127.0.0.1, parquet tables, extra fields, a real SeaweedFS S3 (both formats, lists on S3, bad keys),
and kill -9 of a real `mocostream shards create` process followed by a rerun."""
from __future__ import annotations

import functools
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import assert_same_shard_sets
from mocostream.shards import ShardError, create_shards, verify
from mocostream.shards.download import HttpOptions
from mocostream.shards.verify import tar_samples

REPO = Path(__file__).resolve().parents[1]


def make(sources, out, **kw):
    kw.setdefault("progress", False)
    return create_shards([str(s) for s in sources], str(out), **kw)


def tar_set(out) -> list[dict]:
    m = json.loads((Path(out) / "manifest.json").read_text())
    res = []
    for e in m["shards"]:
        for key, parts in tar_samples((Path(out) / e["name"]).read_bytes()):
            res.append({"key": key, **json.loads(parts["json"]), "data": parts[json.loads(parts["json"])["format"]]})
    return res


def files(root) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file())


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def http_root(imagenette_small):
    """A real http server on 127.0.0.1 serving the imagenette folder."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(imagenette_small))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------- 6. inputs

def test_tar_archives_plain_and_gzip(imagenette_small, tmp_path):
    imgs = files(imagenette_small)[:20]
    for name, mode in (("photos.tar", "w"), ("photos2.tar.gz", "w:gz")):
        with tarfile.open(tmp_path / name, mode) as tf:
            for p in imgs:
                tf.add(p, arcname=f"{p.parent.name}/{p.name}")
            info = tarfile.TarInfo("notes/readme.txt")
            info.size = 5
            tf.addfile(info, io.BytesIO(b"hello"))
    r = make([tmp_path / "photos.tar", tmp_path / "photos2.tar.gz"], tmp_path / "o", dedup="none", workers=2)
    assert r.inputs == 42 and r.written == 40 and [x[1] for x in r.rejected] == ["not_an_image"] * 2
    got = tar_set(tmp_path / "o")
    assert [s["data"] for s in got[:20]] == [p.read_bytes() for p in imgs]
    assert got[0]["source"] == f"{tmp_path / 'photos.tar'}#{imgs[0].parent.name}/{imgs[0].name}"
    assert got[0]["label"] == imgs[0].parent.name and got[20]["key"].endswith("_1")  # same member names: unique keys
    # exact dedup across the two archives: the second copy of each image is a duplicate
    r = make([tmp_path / "photos.tar", tmp_path / "photos2.tar.gz"], tmp_path / "d", workers=0)
    assert r.written == 20 and r.rejected_by_reason() == {"duplicate": 20, "not_an_image": 2}


def test_url_list_over_http_with_extras_into_tar_and_parquet(imagenette_small, http_root, tmp_path):
    imgs = files(imagenette_small)[:12]
    urls = [f"{http_root}/{p.parent.name}/{p.name}" for p in imgs]
    (tmp_path / "urls.txt").write_text("# web photos\n" + "\n".join(urls + [f"{http_root}/nope.jpg"]) + "\n")
    with open(tmp_path / "captioned.jsonl", "w") as f:
        for i, (u, p) in enumerate(zip(urls[:6], imgs[:6])):
            f.write(json.dumps({"url": u, "caption": f"photo {i}", "label": p.parent.name, "score": i / 10}) + "\n")
    local = tmp_path / "paths.lst"
    local.write_text("\n".join(str(p) for p in imgs[6:]) + "\n")
    r = make([tmp_path / "urls.txt", tmp_path / "captioned.jsonl", local], tmp_path / "o", dedup="none", workers=2,
             http=HttpOptions(allow_private=True))  # the server is on loopback
    assert r.inputs == 25 and r.written == 24
    assert r.rejected == [(f"{http_root}/nope.jpg", "http_error", "HTTP 404 File not found")]
    got = tar_set(tmp_path / "o")
    assert [s["data"] for s in got[:12]] == [p.read_bytes() for p in imgs]  # fetched bytes, kept as they were
    assert got[0]["source"] == urls[0] and got[0]["key"] == "urls_000000000013"  # byte offset
    cap = got[12]
    assert (cap["caption"], cap["label"], cap["score"], cap["source"]) == ("photo 0", imgs[0].parent.name, 0.0, urls[0])
    # parquet: extra fields become typed columns
    make([tmp_path / "captioned.jsonl"], tmp_path / "p", fmt="parquet", dedup="none", workers=1,
         http=HttpOptions(allow_private=True))
    t = pq.read_table(tmp_path / "p" / "shard-000000.parquet")
    assert t.column_names[:7] == ["key", "image", "ext", "label", "source", "width", "height"]
    assert t.schema.field("caption").type == pa.string() and t.schema.field("score").type == pa.float64()
    assert t.column("caption").to_pylist() == [f"photo {i}" for i in range(6)]
    assert t.column("label").to_pylist() == [p.parent.name for p in imgs[:6]]


def test_parquet_tables_bytes_and_paths(imagenette_small, tmp_path):
    imgs = files(imagenette_small)[:10]
    pq.write_table(pa.table({"image": [p.read_bytes() for p in imgs] + [b"junk"],
                             "caption": [f"c{i}" for i in range(11)], "label": [1] * 11}),
                   tmp_path / "bytes.parquet", row_group_size=4)
    pq.write_table(pa.table({"path": [str(p) for p in imgs[:3]], "caption": ["x", None, "z"]}),
                   tmp_path / "paths.parquet")
    r = make([tmp_path / "bytes.parquet", tmp_path / "paths.parquet"], tmp_path / "o", dedup="none", workers=2)
    assert r.inputs == 14 and r.written == 13 and r.rejected[0][0] == f"{tmp_path / 'bytes.parquet'}#10"
    got = tar_set(tmp_path / "o")
    assert [s["data"] for s in got] == [p.read_bytes() for p in imgs] + [p.read_bytes() for p in imgs[:3]]
    assert got[3]["caption"] == "c3" and got[3]["label"] == "1" and got[3]["key"] == "bytes_000000003"
    assert got[11].get("caption") is None and got[12]["caption"] == "z"


def test_unreadable_list_is_a_user_error(tmp_path):
    with pytest.raises(ShardError, match="source not found"):
        make([tmp_path / "nope.txt"], tmp_path / "o")
    (tmp_path / "bad.jsonl").write_text('{"caption": "no url"}\n')
    with pytest.raises(ShardError, match="no URL column"):
        make([tmp_path / "bad.jsonl"], tmp_path / "o")


# ---------------------------------------------------------------- S3

@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_create_on_s3_both_formats(s3_env, imagenette_small, tmp_path, fmt):
    bucket = s3_env.make_bucket("shards-io")
    fs = s3_env.filesystem()
    # the input list lives on S3 too, and names S3 objects
    imgs = files(imagenette_small)[::8]  # 15 photos, 10 classes
    for p in imgs:
        fs.pipe(f"{bucket}/raw/{p.parent.name}/{p.name}", p.read_bytes())
    fs.pipe(f"{bucket}/raw/list.txt", "\n".join(f"s3://{bucket}/raw/{p.parent.name}/{p.name}" for p in imgs).encode())
    url = f"s3://{bucket}/{fmt}"
    r = make([f"s3://{bucket}/raw/list.txt"], url, fmt=fmt, samples_per_shard=6, workers=2)
    assert r.written == 15 and len(r.shards) == 3 and r.manifest_url == f"{url}/manifest.json"
    local = make([f"s3://{bucket}/raw/list.txt"], tmp_path / "local", fmt=fmt, samples_per_shard=6, workers=0)
    assert [s["sha256"] for s in r.shards] == [s["sha256"] for s in local.shards]  # same bytes either way
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/{fmt}"))
    expected = ["manifest.json", "manifest.parquet", "rejects.jsonl", "report.json"] + [s[k] for s in r.shards for k in ("name", "stats", "index") if k in s]
    assert names == sorted(expected)  # nothing partial, no temp objects
    assert verify(url) == []
    again = make([f"s3://{bucket}/raw/list.txt"], url, fmt=fmt, samples_per_shard=6, workers=2)
    assert again.already_complete
    # resume on S3: drop the manifest and the last shard's stats -> only the last shard is redone
    fs.rm(f"{bucket}/{fmt}/manifest.json")
    fs.rm(f"{bucket}/{fmt}/{r.shards[-1]['stats']}")
    resumed = make([f"s3://{bucket}/raw/list.txt"], url, fmt=fmt, samples_per_shard=6, workers=1)
    assert resumed.resumed_from == 12 and resumed.shards == r.shards


def test_s3_errors_are_one_line(s3_env, imagenette_small, monkeypatch):
    with pytest.raises(ShardError, match="bucket not found"):
        make([imagenette_small], "s3://no-such-bucket-xyz/shards")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    env = {**os.environ}
    p = subprocess.run([sys.executable, "-m", "mocostream.ops.cli", "shards", "create", str(imagenette_small), "--out",
                        "s3://shards-io/badkeys"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("mocostream: error:") and p.stderr.count("\n") == 1, p.stderr


# ---------------------------------------------------------------- 6. kill -9, rerun

def _stats_count(out: Path) -> int:
    return len(list(out.glob("shard-*_stats.json"))) if out.exists() else 0


def _start(src, out) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mocostream.ops.cli", "shards", "create", str(src), "--out", str(out),
                             "--samples-per-shard", "40", "--workers", "2", "--quiet", "--max-size", "320"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for t in os.listdir(f"/proc/{pid}/task")
                for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:
        return []


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_after(proc, out, shards_done: int) -> None:
    deadline = time.time() + 600  # a failure bound only: the loop leaves at the event, or when the tool exits
    while _stats_count(out) < shards_done and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be killed"
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    # its decode workers notice the main process is gone and exit by themselves (no orphans left decoding)
    assert workers
    deadline = time.time() + 120  # a failure bound only: they go as soon as they see the pipe closed
    while any(map(_running, workers)) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(map(_running, workers))


def test_kill_9_then_rerun_gives_identical_shards(webphotos, tmp_path):
    ref = make([webphotos], tmp_path / "ref", samples_per_shard=40, workers=1, max_size=320)
    out = tmp_path / "out"
    _kill_after(_start(webphotos, out), out, 2)
    assert not (out / "manifest.json").exists()
    for tar in out.glob("shard-*.tar"):  # whatever is visible under a final name is complete
        with tarfile.open(tar) as tf:
            assert len(tf.getnames()) % 2 == 0
        assert tar.with_suffix(".idx").exists()
    # kill the rerun too, early in its first new shard
    before = _stats_count(out)
    _kill_after(_start(webphotos, out), out, before + 1)
    p = subprocess.run([sys.executable, "-m", "mocostream.ops.cli", "shards", "create", str(webphotos), "--out", str(out),
                        "--samples-per-shard", "40", "--workers", "2", "--max-size", "320", "--json"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["resumed_from"] >= 40 * (before + 1) and report["processed_this_run"] < 500
    assert_same_shard_sets(out, tmp_path / "ref")
    assert ref.written + len(ref.rejected) == 500
