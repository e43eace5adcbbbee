"""The main process <-> decode worker protocol under web-size payloads: tasks and results of megabytes, several
in flight per worker, for every kind of input (URL, folder, tar, parquet), run as the real command under a
deadlock detector (tests/deadlock.py: a bounded wait that reports where every process is when it expires, and
fails within seconds when the main process and a worker are both blocked sending to each other); the URL soak
(bench/soak.py) with a web's failure mix; the memory of the main process and of the whole process tree."""
from __future__ import annotations

import functools
import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import assert_same_shard_sets
from deadlock import Hung, run_watched
from mocostream.shards.workers import DEPTH
from webserver import WebServer

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_soak", REPO / "bench" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)
WORKERS = 2
COUNT = 3 * WORKERS * DEPTH  # every worker holds DEPTH tasks at once, three times over
BOUND = 120.0  # seconds: generous; a run here takes a few (a deadlock is reported after 5 s without progress)


@pytest.fixture(scope="module")
def big_jpegs() -> list[bytes]:
    """COUNT noise photos of 2-3 MB each: far larger than a socket buffer (~200 KB), and stored as they are
    (baseline RGB JPEG), so each result is as large as its task."""
    rng = np.random.default_rng(26)
    out = []
    for i in range(COUNT):
        pixels = rng.integers(0, 256, (1300 + 8 * i, 1600, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=95)
        out.append(buf.getvalue())
    assert min(map(len, out)) > 2 << 20
    return out


@pytest.fixture(scope="module")
def server(big_jpegs):
    with WebServer(big_jpegs) as srv:
        yield srv


@functools.cache
def loopback_flags() -> list[str]:
    return soak.loopback_flags()


def create(src: Path, out: Path, workers: int) -> dict:
    cmd = [sys.executable, "-m", "mocostream.ops.cli", "shards", "create", str(src), "--out", str(out),
           "--workers", str(workers), "--dedup", "none", "--samples-per-shard", "7", "--quiet", "--json"]
    p = run_watched(cmd + (loopback_flags() if src.suffix == ".txt" else []), bound=BOUND, cwd=str(REPO))
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


def source(kind: str, images: list[bytes], tmp: Path, server: WebServer) -> Path:
    if kind == "url":
        path = tmp / "urls.txt"
        path.write_text("".join(f"{server.url}/ok/{i}.jpg\n" for i in range(len(images))))
    elif kind == "folder":
        path = tmp / "photos"
        path.mkdir()
        for i, data in enumerate(images):
            (path / f"{i:03d}.jpg").write_bytes(data)
    elif kind == "tar":
        path = tmp / "photos.tar"
        with tarfile.open(path, "w") as tf:
            for i, data in enumerate(images):
                info = tarfile.TarInfo(f"{i:03d}.jpg")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    else:
        path = tmp / "photos.parquet"
        pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "n": list(range(len(images)))}), path,
                       row_group_size=5)
    return path


@pytest.mark.parametrize("kind", ["url", "folder", "tar", "parquet"])
def test_megabyte_tasks_and_results_never_deadlock(kind, big_jpegs, server, tmp_path):
    src = source(kind, big_jpegs, tmp_path, server)
    got = create(src, tmp_path / "workers", WORKERS)
    assert (got["inputs"], got["written"], got["rejected"]) == (COUNT, COUNT, 0), got
    assert got["bytes_out"] > COUNT * (2 << 20)
    # The same bytes as decoding in the main process itself (no protocol at all)
    create(src, tmp_path / "in-process", 0)
    assert_same_shard_sets(tmp_path / "workers", tmp_path / "in-process")


def test_decode_pool_with_megabyte_payloads_in_flight(big_jpegs, tmp_path):
    """The pool alone, fed ("bytes", ...) tasks as the download stage feeds it, in a process of its own."""
    for i, data in enumerate(big_jpegs):
        (tmp_path / f"{i}.jpg").write_bytes(data)
    script = f"""
import sys
from pathlib import Path
from mocostream.shards.record import Record
from mocostream.shards.validate import Options
from mocostream.shards.workers import DecodePool
files = sorted(Path({str(tmp_path)!r}).glob("*.jpg"), key=lambda p: int(p.stem))
tasks = ((("bytes", p.read_bytes()), (p.stem, str(p), "", None)) for p in files)
pool = DecodePool({WORKERS}, Options())
sizes = [len(r.tar) for r, n in pool.imap(tasks) if isinstance(r, Record)]
print(len(sizes), min(sizes))
"""
    p = run_watched([sys.executable, "-c", script], bound=BOUND, cwd=str(REPO))
    assert p.returncode == 0, p.stderr[-3000:]
    n, smallest = map(int, p.stdout.split())
    assert n == COUNT and smallest > 2 << 20


def test_a_busy_main_process_does_not_time_out_a_worker_waiting_for_its_task(tmp_path):
    """The main process away (writing a shard, say) for longer than the per-file budget while a worker waits for
    the rest of a multi-MB task: that wait is not the worker's, so nobody is killed. The consumer's pause is the
    condition under test, not a synchronisation: it has to outlast the budget."""
    script = f"""
import time
from mocostream.shards.validate import Options
from mocostream.shards.workers import DecodePool
tasks = ((("bytes", bytes([i]) * (6 << 20)), None) for i in range({COUNT}))  # no image: rejected in ms
pool = DecodePool(1, Options(), timeout=3.0)
reasons = []
for result, _ in pool.imap(tasks):
    if not reasons:
        time.sleep(6.0)  # the main process busy elsewhere, twice the budget, with a task half sent
    reasons.append(result.reason)
print(pool.replaced, sorted(set(reasons)), len(reasons))
"""
    p = run_watched([sys.executable, "-c", script], bound=BOUND, cwd=str(REPO))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["0", "['not_an_image']", str(COUNT)], p.stdout


def test_the_detector_reports_a_send_send_deadlock():
    """The watcher itself: two processes that each send 4 MB over a socket pair before reading anything
    (the bug the tests above guard against) are reported, with both kernel send waits, well within the bound."""
    script = """
import os, socket
a, b = socket.socketpair()
if os.fork() == 0:
    a.close(); b.sendall(b"x" * (4 << 20)); b.recv(1); os._exit(0)
b.close(); a.sendall(b"y" * (4 << 20)); a.recv(1)
"""
    with pytest.raises(Hung) as hung:
        run_watched([sys.executable, "-c", script], bound=BOUND, stall=3.0)
    report = str(hung.value)
    assert "deadlocked" in report and report.count("wchan sock_alloc_send_pskb") == 2, report
    assert "Current thread" in report or "Stack (most recent call first)" in report, report  # faulthandler


# ---------------------------------------------------------------- soak, memory

SOAK_URLS = 2000  # ~20-40 s on 2 busy cores; bench/soak.py runs 20,000 (the old protocol hung after ~500)


@pytest.mark.slow
def test_url_soak_finishes_with_every_url_accounted_for(tmp_path):
    r = soak.soak(SOAK_URLS, tmp_path)  # raises Hung past its time bound (or at once on a deadlock)
    assert r["inputs"] == SOAK_URLS and r["written"] + sum(r["rejected_by_reason"].values()) == SOAK_URLS, r
    check = r["check"]
    assert check["mismatch_count"] == 0 and check["got"] == check["expected"], check
    assert set(check["expected"]) == {"written", "http_error", "connection", "opted_out"}, check
    # Memory: the main process downloads and writes (no torch, no decoding), the workers decode
    assert r["main_peak_rss_bytes"] < 300e6, r
    assert r["tree_peak_rss_sum_bytes"] < 1e9 and r["processes"] >= 3, r


def test_main_process_of_shards_create_imports_no_torch(server, tmp_path):
    """The main process of `shards create` on a URL list: no torch, no DALI pipeline, no OpenCV (torch alone
    made it 720 MB; the decode workers import what decoding needs)."""
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"{server.url}/ok/{i}.jpg\n" for i in range(3)))
    script = f"""
import json, sys
from mocostream.ops.cli import main
rc = main(["shards", "create", {str(urls)!r}, "--out", {str(tmp_path / "out")!r}, "--workers", "2", "--quiet",
           "--json", *{loopback_flags()!r}])
heavy = [m for m in ("torch", "torchvision", "nvidia.dali", "cv2") if m in sys.modules]
open({str(tmp_path / "modules.json")!r}, "w").write(json.dumps({{"rc": rc, "heavy": heavy}}))
"""
    p = run_watched([sys.executable, "-c", script], bound=BOUND, cwd=str(REPO))
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["written"] == 3
    assert json.loads((tmp_path / "modules.json").read_text()) == {"rc": 0, "heavy": []}
