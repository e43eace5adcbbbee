"""URL ingest for real: a threaded HTTP server on 127.0.0.1 (tests/webserver.py) serving real web photos
under many URLs, with injected latency and each failure kind; streamed tables and --part slices;
--retry-failed; resize modes; metrics; S3 output."""
from __future__ import annotations

import gzip
import json
import subprocess
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mocostream.ops.ports import free_port
from mocostream.shards import ShardError, create_shards, verify
from mocostream.pipeline.filesystems import Storage
from mocostream.shards.discover import Inputs
from mocostream.shards.download import HttpOptions, opted_out, retry_after, user_agent
from mocostream.shards.verify import tar_samples
from helpers import url_list
from webserver import WebServer

# The HTTP timeout is what a hanging URL costs per attempt, and also the longest silence an answered URL may
# show: 5 s, so that a reply delayed by a loaded machine (the server shares this process) is never a timeout.
# The test servers listen on loopback addresses, which are refused unless allowed.
FAST = dict(timeout=5.0, retries=2, backoff=0.05, max_bytes=1 << 20, user_agent_token="moco-test", allow_private=True)


def make(sources, out, http=None, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("workers", 2)
    kw.setdefault("dedup", "none")
    return create_shards([str(s) for s in sources], str(out), http=HttpOptions(**{**FAST, **(http or {})}), **kw)


def lines(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def tar_keys(out) -> list[str]:
    m = json.loads((Path(out) / "manifest.json").read_text())
    return [k for e in m["shards"] for k, _ in tar_samples((Path(out) / e["name"]).read_bytes())]


@pytest.fixture(scope="module")
def photos(webphotos) -> list[bytes]:
    return [p.read_bytes() for p in sorted(Path(webphotos).glob("*.jpg"))[:40]]


@pytest.fixture
def server(photos):
    with WebServer(photos, hang=30.0) as srv:
        yield srv


# ---------------------------------------------------------------- HTTP behaviour and reasons

EXPECTED = {"ok": ("written", None, 1), "404": ("http_error", 404, 1), "reset": ("connection", None, 3),
            "hang": ("timeout", None, 3), "503": ("written", None, 2), "429": ("written", None, 2),
            "optout": ("opted_out", 200, 1), "optout_other": ("written", None, 1), "big": ("too_large", 200, 1),
            "bigchunked": ("too_large", 200, 1)}


@pytest.mark.slow
def test_every_url_accounted_for_with_its_reason(server, tmp_path):
    kinds = [k for k in EXPECTED for _ in range(2)] + ["ok"] * 6
    src = url_list(tmp_path, server, kinds)
    with open(src, "a") as f:
        f.write("http://no-such-host.invalid/x.jpg\n")
    r = make([src], tmp_path / "o", samples_per_shard=5)
    rejects = {d["url"]: d for d in lines(tmp_path / "o" / "rejects.jsonl")}
    written = {json.loads(p["json"])["source"] for e in r.shards
               for _, p in tar_samples((tmp_path / "o" / e["name"]).read_bytes())}
    for i, kind in enumerate(kinds):
        url = f"{server.url}/{kind}/{i}.jpg"
        reason, status, attempts = EXPECTED[kind]
        if reason == "written":
            assert url in written and url not in rejects, kind
        else:
            got = rejects[url]
            assert (got["reason"], got["status"], got["attempts"]) == (reason, status, attempts), kind
            assert len(server.times[f"/{kind}/{i}.jpg"]) == attempts, (kind, got)  # each try is one request
    dns = rejects["http://no-such-host.invalid/x.jpg"]
    assert (dns["reason"], dns["attempts"]) == ("dns", 1)
    assert r.written + len(r.rejected) == r.inputs == len(kinds) + 1
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["rejected_by_reason"] == {"connection": 2, "dns": 1, "http_error": 2, "opted_out": 2,
                                            "timeout": 2, "too_large": 4}
    assert report["success_rate"] == round(r.written / r.inputs, 4)
    assert report["http_status"] == {"200": 20, "404": 2, "none": 5}
    # a transient 503 / 429 is retried no sooner than its Retry-After (1 s)
    for kind in ("503", "429"):
        first, second = server.times[f"/{kind}/{kinds.index(kind)}.jpg"]
        assert second - first >= 1.0
    assert server.agents == {user_agent("moco-test")} and "mocostream/" in user_agent()


@pytest.mark.slow
def test_shards_are_deterministic_whatever_the_download_order(server, tmp_path):
    kinds = ["slow" if i % 3 == 0 else "ok" for i in range(30)]
    src = url_list(tmp_path, server, kinds)
    a = make([src], tmp_path / "a", samples_per_shard=7, http={"concurrency": 16})
    b = make([src], tmp_path / "b", samples_per_shard=7, http={"concurrency": 1}, workers=1)
    assert a.written == 30 and [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]


def test_a_hanging_url_does_not_stall_the_others(server, tmp_path):
    # The first URL is answered only after the server has seen every other URL: with input-order
    # downloading this would never happen (it would wait for its own timeout, 30 s, and fail).
    kinds = ["gate"] + ["ok"] * 30
    server.gate_after = len(kinds)
    r = make([url_list(tmp_path, server, kinds)], tmp_path / "o", http={"timeout": 30.0, "concurrency": 8})
    assert r.written == 31 and len(server.times["/gate/0.jpg"]) == 1


def test_per_host_connection_limit(photos, tmp_path):
    with WebServer(photos, latency=0.05) as srv:
        r = make([url_list(tmp_path, srv, ["ok"] * 40)], tmp_path / "o", http={"concurrency": 32, "per_host": 3})
        assert r.written == 40 and 1 <= srv.peak <= 3


def test_opt_out_parsing_and_flag(server, tmp_path):
    assert opted_out(["noai"], ("mocostream",)) and opted_out(["noindex, nofollow"], ("mocostream",))
    assert not opted_out(["otherbot: noai"], ("mocostream",)) and opted_out(["mocostream: noimageai"], ("mocostream",))
    assert not opted_out(["nofollow"], ("mocostream",))
    assert retry_after("5", 60) == 5 and retry_after("3600", 60) == 60 and retry_after(None, 60) is None
    r = make([url_list(tmp_path, server, ["optout"] * 3)], tmp_path / "o", http={"respect_opt_out": False})
    assert r.written == 3


# ---------------------------------------------------------------- streamed tables, --part

def _laion(n: int, base: str) -> dict:
    return {"URL": [f"{base}/ok/{i}.jpg" for i in range(n)], "TEXT": [f"photo {i}" for i in range(n)],
            "WIDTH": list(range(100, 100 + n)), "similarity": [i / n for i in range(n)]}


def test_laion_style_parquet_and_csv(server, tmp_path):
    t = _laion(12, server.url)
    pq.write_table(pa.table(t), tmp_path / "laion.parquet", row_group_size=5)
    with open(tmp_path / "laion.csv", "w") as f:
        f.write("URL,TEXT,WIDTH,similarity\n")
        f.writelines(f'{u},"{c}, with a comma",{w},{s}\n' for u, c, w, s in zip(*t.values()))
    r = make([tmp_path / "laion.parquet", tmp_path / "laion.csv"], tmp_path / "o", fmt="tar,parquet")
    assert r.written == 24 and not r.rejected
    got = pq.read_table(tmp_path / "o" / "shard-000000.parquet")
    assert got.schema.field("similarity").type == pa.string()  # a float in one table, text in the other
    rows = got.to_pylist()
    assert rows[3]["caption"] == "photo 3" and rows[3]["source"] == t["URL"][3] and rows[3]["key"] == "laion_000000003"
    assert rows[15]["caption"] == "photo 3, with a comma" and rows[15]["WIDTH"] == "103"
    assert "URL" not in got.column_names and "TEXT" not in got.column_names
    make([tmp_path / "laion.parquet"], tmp_path / "p", fmt="parquet", part="1/2")  # row groups 1-2 of 3
    got = pq.read_table(tmp_path / "p" / "part-00001-of-00002" / "shard-000000.parquet")
    assert got.schema.field("similarity").type == pa.float64() and got.schema.field("WIDTH").type == pa.int64()
    assert got.column("key").to_pylist() == [f"laion_{i:09d}" for i in range(6, 12)]
    meta = json.loads(list(tar_samples((tmp_path / "o" / "shard-000000.tar").read_bytes()))[15][1]["json"])
    assert meta["caption"] == "photo 3, with a comma" and meta["similarity"] == "0.25"  # csv values are text


def _keys(src, part, **kw) -> list[str]:
    return [it.key for it in Inputs([str(src)], part, **kw, storage=Storage())]


@pytest.mark.parametrize("name", ["list.txt", "list.csv", "list.jsonl", "list.txt.gz", "list.parquet"])
def test_parts_cover_every_row_once(tmp_path, name):
    urls = [f"http://h/{i}.jpg" for i in range(101)]
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"url": urls}), path, row_group_size=10)
    else:
        text = {"txt": "\n".join(urls), "csv": "url,x\n" + "\n".join(f"{u},{i}" for i, u in enumerate(urls)),
                "jsonl": "\n".join(json.dumps({"url": u}) for u in urls)}[name.split(".")[1]] + "\n"
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    whole = _keys(path, (0, 1))
    parts = [_keys(path, (i, 7)) for i in range(7)]
    assert len(whole) == 101 and sorted(k for p in parts for k in p) == sorted(whole)
    assert all(parts) and max(map(len, parts)) - min(map(len, parts)) <= 4


def test_a_part_reads_only_its_slice(tmp_path):
    good = "".join(json.dumps({"url": f"http://h/{i:03d}.jpg"}) + "\n" for i in range(50))
    (tmp_path / "t.jsonl").write_text(good.replace("{", "x") + good)  # the first half is unreadable
    with pytest.raises(ShardError, match="JSON object"):
        _keys(tmp_path / "t.jsonl", (0, 2))
    second = _keys(tmp_path / "t.jsonl", (1, 2))  # never reads the first half
    assert len(second) == 50
    assert _keys(tmp_path / "t.jsonl", (1, 2)) == second  # keys are byte offsets: the same in any part split


# ---------------------------------------------------------------- --retry-failed

def test_retry_failed_tops_up_a_finished_set(server, tmp_path):
    kinds = ["ok", "down", "404", "ok", "down", "ok", "down"]
    src = url_list(tmp_path, server, kinds)
    server.down = True
    first = make([src], tmp_path / "o", samples_per_shard=2, http={"retries": 0})
    assert first.written == 3 and first.rejected_by_reason() == {"http_error": 4}
    server.down = False
    again = make([src], tmp_path / "o", samples_per_shard=2, http={"retries": 0}, retry_failed=True)
    assert again.written == 6 and again.rejected_by_reason() == {"http_error": 1} and again.inputs == 7
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [s["name"] for s in m["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert m["total_samples"] + m["rejected"] == m["inputs"] == 7
    assert len(server.times["/404/2.jpg"]) == 1  # a final answer is not asked again
    assert sorted(tar_keys(tmp_path / "o")) == sorted(f"urls_{o:012d}" for o in _offsets(src, [0, 1, 3, 4, 5, 6]))
    assert verify(str(tmp_path / "o")) == []
    nothing = make([src], tmp_path / "o", samples_per_shard=2, http={"retries": 0}, retry_failed=True)
    assert nothing.already_complete and nothing.written == 6
    with pytest.raises(ShardError, match="needs a finished run"):
        make([src], tmp_path / "new", retry_failed=True)


def _offsets(path, rows) -> list[int]:
    offs, pos = [], 0
    for line in Path(path).read_bytes().splitlines(keepends=True):
        offs.append(pos)
        pos += len(line)
    return [offs[r] for r in rows]


# ---------------------------------------------------------------- resize modes

@pytest.mark.parametrize("mode", ["longer", "shorter", "center_crop"])
def test_resize_modes_never_upscale(server, tmp_path, photos, mode):
    sizes = [Image.open(__import__("io").BytesIO(p)).size for p in photos[:6]]
    r = make([url_list(tmp_path, server, ["ok"] * 6)], tmp_path / "o", max_size=200, resize_mode=mode)
    got = [json.loads(p["json"]) for e in r.shards for _, p in tar_samples((tmp_path / "o" / e["name"]).read_bytes())]
    for (w, h), meta in zip(sizes, got):
        out = (meta["width"], meta["height"])
        if mode == "longer":
            assert max(out) == min(200, max(w, h))
        elif mode == "shorter":
            assert min(out) == min(200, min(w, h)) and max(out) <= max(w, h)
        else:
            assert out[0] == out[1] == min(200, w, h)


# ---------------------------------------------------------------- metrics, CLI, S3

def test_metrics_are_served_and_valid(server, tmp_path):
    port = free_port()
    make([url_list(tmp_path, server, ["ok", "ok", "404"])], tmp_path / "o", metrics_port=port, part="0/1")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'mocostream_ingest_inputs_total{rank="0",result="written"} 2.0' in text
    assert 'mocostream_ingest_inputs_total{rank="0",result="http_error"} 1.0' in text
    assert 'mocostream_ingest_http_responses_total{code="404",rank="0"} 1.0' in text
    assert "mocostream_ingest_download_seconds_bucket" in text and "mocostream_ingest_requests_in_flight" in text
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.slow
def test_cli_flags_and_one_line_errors(server, tmp_path):
    from helpers import shards_cli as cli

    src = url_list(tmp_path, server, ["ok"] * 4 + ["404"])
    p = cli("create", src, "--out", tmp_path / "o", "--io-concurrency", "8", "--per-host-connections", "2",
            "--http-timeout", "5", "--retries", "1", "--user-agent-token", "cli-test", "--max-download-bytes",
            "2MB", "--resize-mode", "shorter", "--max-size", "128", "--allow-private-addresses", "--json")
    report = json.loads(p.stdout)
    assert report["written"] == 4 and report["rejected_by_reason"] == {"http_error": 1}
    assert user_agent("cli-test") in server.agents
    (tmp_path / "laion.csv").write_text("URL\nhttp://h/1.jpg\n")
    for bad, msg in ((["--io-concurrency", "0"], "--io-concurrency"), (["--http-timeout", "0"], "--http-timeout"),
                     (["--per-host-connections", "0"], "--per-host-connections"), (["--url-col", "nope"], "--url-col"),
                     (["--max-redirects", "-1"], "--max-redirects"), (["--allow-networks", "10.0.0.0/99"], "10.0.0.0/99"),
                     (["--retry-failed"], "needs a finished run")):
        p = cli("create", tmp_path / "laion.csv", "--out", tmp_path / "x", *bad, check=False)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and msg in p.stderr, p.stderr


@pytest.mark.slow
def test_url_ingest_into_s3(s3_env, server, tmp_path):
    bucket = s3_env.make_bucket("ingest")
    src = url_list(tmp_path, server, ["ok"] * 8 + ["404", "503"])
    url = f"s3://{bucket}/web"
    r = make([src], url, samples_per_shard=4)
    assert r.written == 9 and r.rejected_by_reason() == {"http_error": 1} and verify(url) == []
    fs = s3_env.filesystem()
    assert json.loads(fs.cat_file(f"{bucket}/web/rejects.jsonl"))["status"] == 404
