"""A shard set that cannot be corrupted by hand edits, copied folders, odd tables or two runs at once: what a
user who tries to break `shards create / merge` runs into. Real runs, a real loopback HTTP server
(tests/webserver.py), real files."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mocostream.shards import ShardError, merge, verify
from mocostream.shards.download import HttpOptions
from mocostream.shards.verify import tar_samples
from helpers import create_from_loopback, url_list
from webserver import WebServer

FAST = dict(timeout=5.0, retries=0, backoff=0.05, max_bytes=1 << 20, allow_private=True)


def make(sources, out, http=None, **kw):
    return create_from_loopback(sources, out, {**FAST, **(http or {})}, **kw)


def manifest(out) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())


def write_json(path, doc) -> None:
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


@pytest.fixture(scope="module")
def photos(imagenette_small) -> list[bytes]:
    """12 real photos of a few KB (small: a download and its decode result fit the worker pipes)."""
    return [p.read_bytes() for p in sorted(p for p in Path(imagenette_small).rglob("*") if p.is_file())[:12]]


@pytest.fixture
def server(photos):
    with WebServer(photos, hang=30.0) as srv:
        yield srv


# ---------------------------------------------------------------- --retry-failed on an edited set

@pytest.fixture
def down_set(server, tmp_path):
    """A finished set of 4 written samples (one per shard) and 1 retryable reject (503 while `down`)."""
    src = url_list(tmp_path, server, ["ok", "ok", "ok", "down", "ok"])
    server.down = True
    r = make([src], tmp_path / "o", samples_per_shard=1)
    assert r.written == 4 and r.rejected_by_reason() == {"http_error": 1}
    server.down = False
    return src, tmp_path / "o"


def _refused(server, src, out, match) -> None:
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    server.reset_counts()
    with pytest.raises(ShardError, match=match) as err:
        make([src], out, samples_per_shard=1, retry_failed=True)
    assert "\n" not in str(err.value)
    assert server.requests == 0  # the set was checked before anything was fetched or written
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_retry_failed_refuses_a_manifest_missing_its_last_shard(server, down_set):
    src, out = down_set
    m = manifest(out)
    m["shards"].pop()  # edited by hand: the last entry removed
    write_json(out / "manifest.json", m)
    _refused(server, src, out, r"shard-000003\.tar .*not in manifest\.json")


def test_retry_failed_refuses_a_set_with_a_missing_or_replaced_shard(server, down_set):
    src, out = down_set
    shard = (out / "shard-000001.tar").read_bytes()
    (out / "shard-000001.tar").write_bytes(shard[:-1024])
    _refused(server, src, out, r"shard-000001\.tar: .*bytes, manifest\.json says")
    (out / "shard-000001.tar").unlink()
    _refused(server, src, out, r"shard-000001\.tar: missing")
    (out / "shard-000001.tar").write_bytes(shard)
    stats = json.loads((out / "shard-000002_stats.json").read_text())
    stats["shard"]["sha256"] = "0" * 64
    write_json(out / "shard-000002_stats.json", stats)
    _refused(server, src, out, r"shard-000002_stats\.json .*does not match manifest\.json")


def test_retry_failed_refuses_a_manifest_whose_counts_do_not_add_up(server, down_set):
    src, out = down_set
    m = manifest(out)
    m["total_samples"] += 1
    write_json(out / "manifest.json", m)
    _refused(server, src, out, r"manifest\.json: total_samples 5 but its shards hold 4")


def test_a_killed_retry_can_be_run_again(server, down_set, monkeypatch):
    """A retry killed after publishing a shard leaves it unlisted: that shard was never part of a finished
    set, so the next retry replaces it (and the check above must not refuse it)."""
    from mocostream.shards import retry

    src, out = down_set

    def killed(*a, **k):
        raise KeyboardInterrupt  # after the shards were published, before the manifests

    monkeypatch.setattr(retry, "write_set", killed)
    with pytest.raises(KeyboardInterrupt):
        make([src], out, samples_per_shard=1, retry_failed=True)
    assert (out / "shard-000004.tar").exists() and manifest(out)["total_samples"] == 4
    monkeypatch.undo()
    again = make([src], out, samples_per_shard=1, retry_failed=True)
    assert again.written == 5 and not again.rejected and verify(str(out)) == []


def test_retry_failed_checks_and_tops_up_a_set_in_both_formats(server, tmp_path):
    src = url_list(tmp_path, server, ["ok", "down", "ok"])
    server.down = True
    out = tmp_path / "o"
    assert make([src], out, samples_per_shard=1, format="tar,parquet").written == 2
    server.down = False
    again = make([src], out, samples_per_shard=1, format="tar,parquet", retry_failed=True)
    assert again.written == 3 and verify(str(out)) == []
    assert json.loads((out / "manifest-parquet.json").read_text())["total_samples"] == 3


# ---------------------------------------------------------------- shards merge

@pytest.fixture
def image_list(imagenette_small, tmp_path) -> tuple[Path, list[Path]]:
    """A .txt list of 20 local photos (the same name is reused for another list below)."""
    paths = sorted(p for p in Path(imagenette_small).rglob("*") if p.is_file())
    (tmp_path / "list.txt").write_text("".join(f"{p}\n" for p in paths[:20]))
    return tmp_path / "list.txt", paths


def test_merge_refuses_a_part_folder_copied_over_another(image_list, tmp_path):
    src, _ = image_list
    out = tmp_path / "parts"
    for i in range(4):
        make([src], out, part=f"{i}/4", samples_per_shard=3)
    shutil.rmtree(out / "part-00003-of-00004")
    shutil.copytree(out / "part-00002-of-00004", out / "part-00003-of-00004")
    with pytest.raises(ShardError, match=r"part-00003-of-00004 holds part 2/4 .*not 3/4"):
        merge(str(out))
    m = manifest(out / "part-00003-of-00004")
    m["options"]["part"] = "3/4"  # and its recorded part edited to match the folder
    write_json(out / "part-00003-of-00004" / "manifest.json", m)
    with pytest.raises(ShardError, match=r"5 sample key\(s\) occur in more than one part "
                                         r"\(part-00002-of-00004, part-00003-of-00004\)"):
        merge(str(out))
    assert not (out / "manifest.json").exists()
    shutil.rmtree(out / "part-00003-of-00004")
    make([src], out, part="3/4", samples_per_shard=3)
    report = merge(str(out))
    assert report["inputs"] == 20 == report["written"] and verify(str(out)) == []


def test_merge_key_check_confirms_hash_matches_with_the_keys(monkeypatch):
    from mocostream.shards import overlap

    parts = [("a", lambda: ["k1", "k2"]), ("b", lambda: ["k3", "k2"]), ("c", lambda: ["k4"])]
    assert overlap.shared_keys(parts) == (1, ["a", "b"])
    monkeypatch.setattr(overlap, "BUCKET", 16)  # many buckets: a shared key is found in whichever it falls
    many = [(f"p{p}", lambda p=p: [f"key{p * 100 + i}" for i in range(100)] + (["key7"] if p == 3 else []))
            for p in range(5)]
    assert overlap.shared_keys(many) == (1, ["p0", "p3"])
    monkeypatch.setattr(overlap, "_hash", lambda key: 7)  # every key collides: only k2 is really shared
    assert overlap.shared_keys(parts) == (1, ["a", "b"])
    assert overlap.shared_keys(parts[:1] + parts[2:]) == (0, [])


def test_merge_refuses_a_part_made_from_another_list_of_the_same_name(image_list, tmp_path):
    src, paths = image_list
    out = tmp_path / "parts"
    make([src], out, part="0/2", samples_per_shard=5)
    src.write_text("".join(f"{p}\n" for p in paths[20:34]))  # another list, same file name
    make([src], out, part="1/2", samples_per_shard=5)
    with pytest.raises(ShardError, match=r"part-00001-of-00002 was made from other input files .*list\.txt"):
        merge(str(out))
    assert not (out / "manifest.json").exists()


# ---------------------------------------------------------------- credentials in URLs

def test_url_credentials_are_used_but_never_stored(server, tmp_path):
    host = server.url.removeprefix("http://")
    src = tmp_path / "urls.txt"
    src.write_text(f"http://user:secret@{host}/ok/0.jpg\nhttp://user:secret@{host}/404/1.jpg\n"
                   f"http://user:secret@{host}/reset/2.jpg\nhttp://user:secret@127.0.0.1:99999/ok/3.jpg\n")
    r = make([src], tmp_path / "o", format="tar,parquet")
    assert r.written == 1 and r.rejected_by_reason() == {"connection": 2, "http_error": 1}
    assert server.auth["/ok/0.jpg"] == "Basic dXNlcjpzZWNyZXQ="  # the request still carries them
    leaks = [p.name for p in (tmp_path / "o").iterdir() if p.is_file() and b"secret" in p.read_bytes()]
    assert leaks == []
    (e,) = manifest(tmp_path / "o")["shards"]
    meta = json.loads(next(tar_samples((tmp_path / "o" / e["name"]).read_bytes()))[1]["json"])
    assert meta["source"] == f"http://{host}/ok/0.jpg"
    import pyarrow.parquet as pq
    assert pq.read_table(tmp_path / "o" / "shard-000000.parquet").column("source").to_pylist() == [meta["source"]]
    rejects = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert rejects[0]["url"] == f"http://{host}/404/1.jpg"


# ---------------------------------------------------------------- CSV / TSV parsed as CSV

def test_csv_captions_with_line_breaks_and_a_bom(image_list, tmp_path):
    _, paths = image_list
    caption = 'a caption\nover two lines, with "quotes"'
    text = ("\ufeffpath,caption,n\r\n" + f'{paths[0]},"{caption.replace(chr(34), chr(34) * 2)}",1\r\n'
            + f"{paths[1]},plain,2\r\n")
    (tmp_path / "list.csv").write_text(text, newline="")
    r = make([tmp_path / "list.csv"], tmp_path / "o", samples_per_shard=5)
    assert r.inputs == 2 and r.written == 2
    (e,) = manifest(tmp_path / "o")["shards"]
    metas = [json.loads(p["json"]) for _, p in tar_samples((tmp_path / "o" / e["name"]).read_bytes())]
    assert [(m["caption"], m["n"]) for m in metas] == [(caption, "1"), ("plain", "2")]


@pytest.mark.parametrize("name", ["list.csv", "list.tsv", "list.csv.gz"])
def test_parts_split_csv_records_not_lines(tmp_path, name, monkeypatch):
    import gzip
    import random

    from mocostream.shards import tables
    from mocostream.shards.discover import Inputs

    # a part looks back only 64 bytes at first: every case of the lookback is met
    monkeypatch.setattr(tables, "SCAN_CHUNK", 64, raising=False)
    rng, sep = random.Random(0), "\t" if ".tsv" in name else ","
    captions = ["plain", '"with, comma"', '"two\nlines"', '"quote ""x""\r\nend"', "", '"a\n\nb"', '"\n"', 'x"y',
                '"a"b', '"' + "long\n" * 40 + '"']
    text = f"url{sep}caption\n" + "".join(f"http://h/{i}.jpg{sep}{rng.choice(captions)}\n" for i in range(200))
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    whole = [(it.key, it.path) for it in Inputs([str(path)])]
    assert [p for _, p in whole] == [f"http://h/{i}.jpg" for i in range(200)]  # no phantom rows
    for n in (2, 3, 7, 40, 300):
        parts = [[(it.key, it.path) for it in Inputs([str(path)], (i, n))] for i in range(n)]
        joined = [x for p in parts for x in p]
        assert sorted(joined) == sorted(whole)  # each record in exactly one part
        assert joined == whole or name.endswith(".gz")  # byte ranges (compressed: every n-th record)


@pytest.mark.parametrize("name", ["list.txt", "list.jsonl", "list.tsv"])
def test_a_bom_is_not_part_of_the_first_row(tmp_path, name):
    from mocostream.shards.discover import Inputs

    rows = {"txt": "http://h/0.jpg\nhttp://h/1.jpg\n", "tsv": "url\tx\nhttp://h/0.jpg\t1\nhttp://h/1.jpg\t2\n",
            "jsonl": '{"url": "http://h/0.jpg"}\n{"url": "http://h/1.jpg"}\n'}[name.split(".")[1]]
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + rows.encode())
    assert [it.path for it in Inputs([str(tmp_path / name)])] == ["http://h/0.jpg", "http://h/1.jpg"]


# ---------------------------------------------------------------- rejects.jsonl cut short or emptied

def test_a_cut_short_rejects_file_is_a_one_line_error(server, down_set):
    src, out = down_set
    raw = (out / "rejects.jsonl").read_bytes()
    (out / "rejects.jsonl").write_bytes(raw[: len(raw) // 2])
    for retry in (False, True):
        with pytest.raises(ShardError, match=r"rejects\.jsonl line 1 is not a reject record") as err:
            make([src], out, samples_per_shard=1, retry_failed=retry)
        assert "\n" not in str(err.value)


def test_an_emptied_rejects_file_is_a_warning_not_silence(server, down_set):
    from helpers import shards_cli as cli

    src, out = down_set
    (out / "rejects.jsonl").write_bytes(b"")
    server.reset_counts()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = make([src], out, samples_per_shard=1, retry_failed=True)
    assert r.written == 4 and len(r.warnings) == 1 and "lists 0 reject(s) but manifest.json counts 1" in r.warnings[0]
    p = cli("create", src, "--out", out, "--samples-per-shard", "1", "--retry-failed", "--retries", "0",
            "--max-download-bytes", "1MiB", "--dedup", "none", "--workers", "1", "--quiet", "--allow-private-addresses")
    assert p.stderr.count("\n") == 1 and "shards create: warning: " in p.stderr and "nothing to retry" in p.stderr
    assert server.requests == 0 and {p.name: p.read_bytes() for p in out.iterdir()} == before


# ---------------------------------------------------------------- one run per destination

def test_a_second_create_into_the_same_dest_is_refused(server, tmp_path):
    import subprocess
    import sys

    src = url_list(tmp_path, server, ["ok", "gate", "ok"])
    server.gate_after = 10**9  # /gate/1.jpg is answered when the test says so
    out = tmp_path / "o"
    args = ["create", src, "--out", out, "--workers", "1", "--dedup", "none", "--http-timeout", "60",
            "--max-download-bytes", "1MiB", "--quiet", "--allow-private-addresses"]
    first = subprocess.Popen([sys.executable, "-m", "mocostream.ops.cli", "shards", *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with server.seen:  # the first run holds the lock from its start: it is downloading now
            assert server.seen.wait_for(lambda: "/gate/1.jpg" in server.times or first.poll() is not None, 120)
        with pytest.raises(ShardError, match=rf"another `shards create` \(pid {first.pid}\) is writing into") as err:
            make([src], out)
        assert "\n" not in str(err.value) and (out / ".mocostream-create.lock").exists()
    finally:
        with server.seen:
            server.gate_after = 0
            server.seen.notify_all()
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert manifest(out)["total_samples"] == 3 and verify(str(out)) == []
    assert not (out / ".mocostream-create.lock").exists()
    assert make([src], out).already_complete  # the lock is free again


# ---------------------------------------------------------------- odd HTTP answers

def rejects(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "rejects.jsonl").read_text().splitlines()]


ONE_CONNECTION = {"retries": 2, "per_host": 1, "concurrency": 1}


def test_redirects_off_http_and_oversized_headers_are_final_reasons(server, tmp_path):
    src = url_list(tmp_path, server, ["to_file", "to_ftp", "bigheader", "ok"])
    r = make([src], tmp_path / "o", http=ONE_CONNECTION)
    got = {d["source"].rsplit("/", 2)[1]: d for d in rejects(tmp_path / "o")}
    assert sorted(got) == ["bigheader", "to_file", "to_ftp"] and r.written == 1
    assert all(d["reason"] == "http_error" and d["attempts"] == 1 for d in got.values())  # final: not retried
    assert "file" in got["to_file"]["detail"] and "ftp" in got["to_ftp"]["detail"]
    assert "8190 bytes" in got["bigheader"]["detail"]
    server.reset_counts()
    again = make([src], tmp_path / "o", http=ONE_CONNECTION, retry_failed=True)
    assert again.already_complete and server.requests == 0  # --retry-failed does not ask again either


def test_a_body_longer_than_its_content_length_never_poisons_the_connection(server, photos):
    """One connection: longbody's reply is complete, then more bytes arrive on the kept-alive connection.
    They must not become the next URL's reply (nor that one's the one after)."""
    import select

    from mocostream.shards.download import Downloader

    got = []
    downloader = Downloader(HttpOptions(**{**FAST, "per_host": 1, "concurrency": 1}))
    try:
        for i, kind in enumerate(["longbody", "ok", "ok"]):
            downloader.submit(i, f"{server.url}/{kind}/{i}.jpg")
            while len(got) <= i:
                assert select.select([downloader.fileno()], [], [], 30)[0], "no download finished within 30 s"
                got += downloader.completed()
            if kind == "longbody":
                server.extra.set()
                assert server.extra_sent.wait(60)
    finally:
        downloader.close()
    assert [(tag, o.reason, o.data) for tag, o in got] == [(i, "", photos[i]) for i in range(3)]


@pytest.mark.slow
def test_a_drip_fed_body_times_out_saying_what_arrived(server, tmp_path):
    src = url_list(tmp_path, server, ["drip"])
    r = make([src], tmp_path / "o", http={"timeout": 1.0})
    assert r.rejected_by_reason() == {"timeout": 1}
    (d,) = rejects(tmp_path / "o")
    assert "HTTP 200" in d["detail"] and "no answer" not in d["detail"], d["detail"]
    assert int(d["detail"].split(" after ")[1].split()[0]) > 0  # bytes had arrived


# ---------------------------------------------------------------- rows without URL, paths that are not UTF-8

def test_a_row_without_url_is_rejected_as_no_url(image_list, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, paths = image_list
    pq.write_table(pa.table({"url": [str(paths[0]), None, str(paths[1])]}), tmp_path / "t.parquet")
    csv_head = f"url,caption\n{paths[0]},a\n"
    (tmp_path / "t.csv").write_text(csv_head + ",b\n")
    jsonl_head = json.dumps({"url": str(paths[0])}) + "\n"
    (tmp_path / "t.jsonl").write_text(jsonl_head + json.dumps({"url": None}) + "\n")
    for name, row in (("t.parquet", 1), ("t.csv", len(csv_head)), ("t.jsonl", len(jsonl_head))):
        out = tmp_path / name.replace(".", "_")
        make([tmp_path / name], out)
        (d,) = rejects(out)
        assert (d["reason"], d["detail"], d["source"]) == ("unreadable", "no URL", f"{tmp_path / name}#{row}"), d


def test_a_path_that_is_not_utf8_keeps_its_bytes(image_list, tmp_path):
    _, paths = image_list
    odd = os.fsencode(tmp_path) + b"/caf\xe9 \xff.jpg"  # Latin-1 and a stray byte: not UTF-8
    with open(odd, "wb") as f:
        f.write(paths[0].read_bytes())
    (tmp_path / "list.txt").write_bytes(odd + b"\n" + os.fsencode(paths[1]) + b"\n")
    r = make([tmp_path / "list.txt"], tmp_path / "o")
    assert r.written == 2, r.rejected
    (e,) = manifest(tmp_path / "o")["shards"]
    metas = [json.loads(p["json"]) for _, p in tar_samples((tmp_path / "o" / e["name"]).read_bytes())]
    assert metas[0]["source"] == f"{tmp_path}/caf\ufffd \ufffd.jpg"  # stored as valid text
    from mocostream.shards.discover import locator
    assert locator(b"http://h/caf\xe9.jpg".decode("utf-8", "surrogateescape")) == ("http", "http://h/caf%E9.jpg")
