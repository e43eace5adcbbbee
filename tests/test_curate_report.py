"""report.html of `mocostream curate`: built from real shards (tar with and without DALI index, parquet) and a
selection written to the tool's output contract (selection.parquet + report.json), then opened in a real
headless Chromium driven over the DevTools protocol: it loads without console errors or fetches, and its
thumbnails render (the screenshot's pixels are the thumbnails, inside the planted kept/dropped border colours).
The streamed choice of what the report shows is checked on a larger synthetic selection."""
from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mocostream.curate.report import ReportOptions, build_report, write_report
from mocostream.curate.report_html import COLOURS
from mocostream.curate.report_images import read_thumbnails, shard_images
from mocostream.curate.report_scan import (choose_clusters, count_rows, merge_heavy, open_selection,
                                           sample_rows)
from mocostream.pipeline.filesystems import Storage
from mocostream.pipeline.readers import read_samples
from mocostream.pipeline.shard import Shard

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--force-color-profile=srgb", "--hide-scrollbars", "--remote-debugging-pipe"]


# ---- the tool's output, written to its contract -------------------------------------------------------
@pytest.fixture(scope="module")
def shard_set(imagenette_small, tmp_path_factory) -> Path:
    """120 real photos as 4 tar shards (with DALI index) and the same 4 as parquet, by the shard tool."""
    from mocostream.shards import create_shards

    out = tmp_path_factory.mktemp("curate-shards") / "set"
    create_shards([str(imagenette_small)], str(out), fmt="tar,parquet", samples_per_shard=30, progress=False,
                  dedup="none")
    return out


def samples_of(shards: list[Path]) -> list[tuple[str, str, int]]:
    """(key, shard, member) of every sample, in each shard's read order."""
    out = []
    for path in shards:
        shard = Shard(str(path), None, path.suffix[1:])
        out += [(s.key, str(path), m) for m, s in enumerate(read_samples(shard, path.read_bytes()))]
    return out


def write_selection(dest: Path, rows: list[dict], levels: list[int], **info) -> None:
    """selection.parquet and report.json as `mocostream curate` writes them (its output contract)."""
    dest.mkdir(parents=True, exist_ok=True)
    columns = {"key": pa.string(), "shard": pa.string(), "member": pa.int32(), "kept": pa.bool_()}
    columns.update({f"cluster_{i}": pa.int32() for i in range(len(levels))})
    columns.update(dup_of=pa.string(), reason=pa.string())
    pq.write_table(pa.table({c: pa.array([r[c] for r in rows], t) for c, t in columns.items()}),
                   dest / "selection.parquet", row_group_size=50)
    reasons = [r["reason"] for r in rows]
    kept = np.array([r["kept"] for r in rows])
    ids = np.array([r["cluster_0"] for r in rows])
    (dest / "report.json").write_text(json.dumps({
        "inputs": len(rows), "kept": int(kept.sum()),
        "dropped": {"duplicate": reasons.count("duplicate"), "balanced_out": reasons.count("balanced_out")},
        "levels": levels, "keep_fraction": 0.5, "dedup_eps": 0.05,
        "cluster_sizes_before": np.bincount(ids, minlength=levels[0]).tolist(),
        "cluster_sizes_after": np.bincount(ids[kept], minlength=levels[0]).tolist(),
        "embed": {"backbone": "resnet18", "dim": 512, "image_size": 224}, "fingerprint": "f" * 16, **info}))


# Cluster 0: 8 kept, 20 duplicates of three of them (12, 5, 3), 12 balanced out; cluster 1: 10 kept, 6
# duplicates of one, 8 balanced out; cluster 2: 14 kept (one of them in a shard that does not exist);
# clusters 3..: 1 to 3 samples each, kept; clusters 40..47 empty.
def planted_rows(samples: list[tuple[str, str, int]]) -> list[dict]:
    order = list(range(len(samples)))
    random.Random(0).shuffle(order)  # clusters spread over shards and formats
    plan = ([(0, "kept")] * 8 + [(0, "duplicate")] * 20 + [(0, "balanced_out")] * 12 + [(1, "kept")] * 10
            + [(1, "duplicate")] * 6 + [(1, "balanced_out")] * 8 + [(2, "kept")] * 13)
    cluster = 3
    while len(plan) < len(samples):
        plan += [(cluster, "kept")] * min(1 + cluster % 3, len(samples) - len(plan))
        cluster += 1
    rows, heads = [], {}
    for i, (c, reason) in zip(order, plan):
        key, shard, member = samples[i]
        rows.append(dict(key=key, shard=shard, member=member, kept=reason == "kept", cluster_0=c, cluster_1=c % 4,
                         reason=reason, dup_of=None))
        if reason == "kept":
            heads.setdefault(c, []).append(key)
    dups = [r for r in rows if r["reason"] == "duplicate"]
    for r, head in zip(dups, [heads[0][0]] * 12 + [heads[0][1]] * 5 + [heads[0][2]] * 3 + [heads[1][0]] * 6):
        r["dup_of"] = head
    rows.append(dict(key='gone<b>"1', shard=str(Path(rows[0]["shard"]).parent / "gone-000000.tar"), member=0,
                     kept=True, cluster_0=2, cluster_1=2, reason="kept", dup_of=None))
    return rows


@pytest.fixture(scope="module")
def curated(shard_set, tmp_path_factory) -> Path:
    """A destination folder as `mocostream curate` leaves it, over tar and parquet shards; the first tar
    lost its DALI index (read through the pipeline's reader instead)."""
    tars, parquets = sorted(shard_set.glob("shard-*.tar")), sorted(shard_set.glob("shard-*.parquet"))
    (shard_set / "shard-000000.idx").unlink(missing_ok=True)
    dest = tmp_path_factory.mktemp("curated") / "dest"
    write_selection(dest, planted_rows(samples_of(tars[:2] + parquets[2:])), [48, 4])
    return dest


# ---- reading the thumbnails ---------------------------------------------------------------------------
def test_images_come_from_their_position_in_tar_and_parquet_shards(shard_set):
    """Each way of reading a member (tar by index, tar without index, parquet row groups) gives the image the
    pipeline's reader gives at that position; a wrong key, a missing member or shard cost their own thumbnail."""
    storage = Storage()
    for name in ("shard-000001.tar", "shard-000002.parquet"):
        shard = shard_set / name
        samples = list(read_samples(Shard(str(shard), None, shard.suffix[1:]), shard.read_bytes()))
        members = {m: samples[m].key for m in (0, 7, len(samples) - 1)}
        assert shard_images(str(shard), members, storage) == {m: samples[m].data for m in members}
        got = shard_images(str(shard), {3: "not-its-key", len(samples): "past-the-end"}, storage)
        assert "the selection 'not-its-key'" in got[3] and got[len(samples)] == "no such member in the shard"
    plain = shard_set.parent / "no-index" / "shard-000001.tar"
    plain.parent.mkdir(exist_ok=True)
    shutil.copy(shard_set / "shard-000001.tar", plain)  # no .idx beside it: one read of the whole shard
    samples = list(read_samples(Shard(str(plain), None, "tar"), plain.read_bytes()))
    assert shard_images(str(plain), {5: samples[5].key}, storage) == {5: samples[5].data}
    gone = shard_images(str(shard_set / "gone-000000.tar"), {0: "x"}, storage)
    assert gone[0].startswith("shard not readable: FileNotFoundError")
    thumbs = read_thumbnails([(str(plain), 5, samples[5].key), (str(plain), 99, "x")], storage, px=64)
    ok, missing = thumbs[(str(plain), 5)], thumbs[(str(plain), 99)]
    assert ok.uri.startswith("data:image/jpeg;base64,") and max(ok.width, ok.height) == 64 and ok.error is None
    assert missing.uri is None and missing.error == "no such member in the shard"


def test_report_html_holds_everything_it_shows(curated):
    """One file: no script, stylesheet or URL to fetch; every image a data: URI; the counts, the plot, the
    chosen clusters and the duplicate groups with their sizes; the missing shard shown as missing."""
    html = build_report(str(curated), Storage(), ReportOptions(largest_clusters=3, small_clusters=4))
    assert not re.search(r"<script|<link|@import|https?://|url\(", html)
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    assert '<svg width="640" height="300"' in html and html.count("<polyline") == 2
    for cluster in (0, 1, 2):
        assert f'id="grid-c{cluster}"' in html
    grid0 = html.split('id="grid-c0"')[1].split("</div>")[0]
    assert grid0.count('class="t kept"') == 8 and grid0.count('class="t duplicate"') + grid0.count(
        'class="t balanced_out"') == 16  # 24 shown: all 8 kept, 16 of the 32 dropped
    assert len(re.findall(r'id="grid-c\d+"', html)) == 3 + 4
    sizes = re.findall(r"kept, and ([\d,]+) samples? dropped as its duplicates", html)
    assert [int(n.replace(",", "")) for n in sizes] == [12, 6, 5, 3]
    assert "gone&lt;b&gt;&quot;1" in html and "gone<b>" not in html  # keys are data: escaped
    assert "shard not readable: FileNotFoundError" in html
    assert "disagree" not in html and "no valid finest cluster" not in html
    assert "<td>inputs</td><td>121</td><td>100.0%</td><td>121</td>" in html


@pytest.mark.slow
def test_report_from_object_storage(shard_set, curated, s3_server):
    """Shards, selection and report.json in a real S3 server (SeaweedFS): the thumbnails come by byte ranges
    and row groups from there, and report.html is written there, the same page as from local files."""
    fs, bucket = s3_server.filesystem(), s3_server.make_bucket("curated")
    for path in shard_set.glob("shard-*"):
        fs.put(str(path), f"{bucket}/set/{path.name}")
    table = pq.read_table(curated / "selection.parquet")
    local = str(shard_set) + "/"
    shards = [u.replace(local, f"s3://{bucket}/set/") for u in table.column("shard").to_pylist()]
    assert all(u.startswith("s3://") for u in shards[:-1])
    buf = io.BytesIO()
    pq.write_table(table.set_column(table.schema.get_field_index("shard"), "shard", pa.array(shards)), buf)
    fs.pipe(f"{bucket}/dest/selection.parquet", buf.getvalue())
    fs.put(str(curated / "report.json"), f"{bucket}/dest/report.json")
    storage = Storage(environ=s3_server.env)
    assert write_report(f"s3://{bucket}/dest", storage) == f"s3://{bucket}/dest/report.html"
    remote = fs.cat(f"{bucket}/dest/report.html").decode()
    here = build_report(str(curated), Storage())
    assert re.findall(r'src="(data:[^"]*)"', remote) == re.findall(r'src="(data:[^"]*)"', here)
    assert len(re.findall(r'src="data:', remote)) > 50


def test_a_report_json_without_levels_is_refused_in_one_line(curated, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    shutil.copy(curated / "selection.parquet", dest)
    (dest / "report.json").write_text(json.dumps({"inputs": 1}))
    with pytest.raises(ValueError, match="has no 'levels' list"):
        write_report(str(dest), Storage())
    assert sorted(p.name for p in dest.iterdir()) == ["report.json", "selection.parquet"]


# ---- the streamed choice, at a larger scale ------------------------------------------------------------
def synthetic_selection(dest: Path, rows: int = 200_000, clusters: int = 2000, seed: int = 1) -> dict:
    """A long-tailed selection with two large duplicate groups spread over the whole file."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, clusters + 1) ** 1.1
    ids = rng.choice(clusters, rows, p=weights / weights.sum()).astype(np.int32)
    kept = rng.random(rows) < 0.5
    keys = np.array([f"k{i}" for i in range(rows)], dtype=object)
    dup_of = np.full(rows, None, dtype=object)
    dropped = np.flatnonzero(~kept)
    heavy = {"k0": 5000, "k1": 2000}
    kept[[0, 1]] = True
    at = rng.permutation(dropped[dropped > 1])
    dup_of[at[:5000]], dup_of[at[5000:7000]] = "k0", "k1"
    dup_of[at[7000:40000]] = [f"k{i}" for i in rng.choice(np.flatnonzero(kept)[2:], 33000)]
    reason = np.where(kept, "kept", np.where(dup_of != None, "duplicate", "balanced_out"))  # noqa: E711
    ids[[40, 50]] = clusters  # out of range, as are the nulls: counted apart, never indexed
    null = np.zeros(rows, bool)
    null[[10, 20, 30]] = True
    dest.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": keys, "shard": [f"s-{i // 1000:06d}.tar" for i in range(rows)],
                             "member": pa.array(np.arange(rows) % 1000, pa.int32()), "kept": kept,
                             "cluster_0": pa.array(ids, mask=null), "cluster_1": ids // 50,
                             "dup_of": pa.array(dup_of, pa.string()), "reason": reason}),
                   dest / "selection.parquet", row_group_size=20_000)
    valid = ~null & (ids < clusters)
    return dict(ids=ids[valid], kept=kept[valid], reason=reason, clusters=clusters)


def test_the_streamed_choice_keeps_only_what_the_report_shows(tmp_path):
    truth = synthetic_selection(tmp_path)
    before = pa.total_allocated_bytes()
    pf = open_selection(str(tmp_path / "selection.parquet"))
    counts = count_rows(pf, truth["clusters"], batch_rows=8192, capacity=64)
    assert counts.rows == 200_000 and counts.unclustered == 5
    assert (counts.total == np.bincount(truth["ids"], minlength=truth["clusters"])).all()
    assert (counts.kept == np.bincount(truth["ids"][truth["kept"]], minlength=truth["clusters"])).all()
    assert counts.reasons == {r: int((truth["reason"] == r).sum()) for r in ("kept", "duplicate", "balanced_out")}
    assert counts.dup_candidates[:2] == ["k0", "k1"] and len(counts.dup_candidates) <= 64
    largest, small = choose_clusters(counts.total, 5, 10, seed=3)
    assert largest == sorted(range(truth["clusters"]), key=lambda c: (-counts.total[c], c))[:5]
    median = np.median(counts.total[counts.total > 0])
    assert len(small) == 10 and all(0 < counts.total[c] <= median for c in small) and not set(small) & set(largest)
    assert choose_clusters(counts.total, 5, 10, seed=3)[1] == small != choose_clusters(counts.total, 5, 10, 4)[1]
    got = sample_rows(pf, largest + small, counts.dup_candidates, per_cluster=24, per_group=12, groups=2, seed=0,
                      batch_rows=8192)
    assert sorted(got.clusters) == sorted(largest + small)
    for cluster, rows in got.clusters.items():
        kept = rows.column("kept").to_pylist()
        assert set(rows.column("cluster_0").to_pylist()) == {cluster}
        assert rows.num_rows == min(24, counts.total[cluster]) and kept == sorted(kept, reverse=True)
        if counts.kept[cluster] >= 12 and counts.total[cluster] - counts.kept[cluster] >= 12:
            assert sum(kept) == 12
    # What stays allocated while the file is open is what the report shows, not the rows read (a reader that
    # kept its column chunks, as pyarrow's pre-buffering does, would hold about the file's size here).
    assert pa.total_allocated_bytes() - before < (tmp_path / "selection.parquet").stat().st_size / 10
    top = got.clusters[largest[0]].column("key").to_pylist()
    assert max(int(k[1:]) for k in top) > 100_000 > min(int(k[1:]) for k in top)  # drawn over the whole file
    assert [(k, n) for k, n, _, _ in got.dup_groups] == [("k0", 5000), ("k1", 2000)]
    for key, _, head, drops in got.dup_groups:
        assert head.column("key").to_pylist() == [key] and set(drops.column("dup_of").to_pylist()) == {key}
        assert drops.num_rows == 12
    again = sample_rows(pf, largest + small, counts.dup_candidates, per_cluster=24, per_group=12, groups=2, seed=0,
                        batch_rows=50_000)
    assert all(again.clusters[c].equals(got.clusters[c]) for c in got.clusters)  # whatever the batch size


def test_the_heavy_hitter_summary_stays_bounded_and_finds_the_large_groups():
    rng = np.random.default_rng(0)
    summary = None
    for _ in range(50):
        values = np.concatenate([rng.integers(0, 100_000, 5000).astype(str), ["big"] * 200, ["second"] * 100])
        summary = merge_heavy(summary, pa.array(rng.permutation(values)), capacity=32)
        assert summary.num_rows <= 32
    ranked = summary.sort_by([("n", "descending")]).column("k").to_pylist()
    assert ranked[:2] == ["big", "second"]


# ---- in a real browser --------------------------------------------------------------------------------
class Chromium:
    """A real headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: it
    reads fd 3 and writes fd 4, messages end with NUL): no port to find, nothing to poll for readiness."""

    def __init__(self, workdir: Path):
        child_in, self._out = os.pipe()
        self._in, child_out = os.pipe()

        def at_3_and_4():  # in the child, before exec: the pipe ends at fds 3 and 4 (by way of free fds >= 10,
            # so that neither end is overwritten while the other moves)
            a, b = fcntl.fcntl(child_in, fcntl.F_DUPFD, 10), fcntl.fcntl(child_out, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)
            os.close(a)
            os.close(b)

        self.log_path = workdir / "chromium.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'profile'}",
                                          "about:blank"], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=at_3_and_4, close_fds=False,
                                         start_new_session=True)
        os.close(child_in)
        os.close(child_out)
        self._buf, self._id, self.events = bytearray(), 0, []

    def _message(self) -> dict:
        while b"\0" not in self._buf:
            if not select.select([self._in], [], [], 120)[0]:
                raise AssertionError(f"Chromium said nothing for 120 s:\n{self.log_path.read_text()[-2000:]}")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise AssertionError(f"Chromium closed its pipe (exit status {self.proc.poll()}):\n"
                                     f"{self.log_path.read_text()[-2000:]}")
            self._buf += chunk
        end = self._buf.index(b"\0")
        message = json.loads(bytes(self._buf[:end]))
        del self._buf[:end + 1]
        return message

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._out, json.dumps(message).encode() + b"\0")  # small: one write
        while True:
            answer = self._message()
            if answer.get("id") == self._id:
                assert "error" not in answer, f"{method}: {answer['error']}"
                return answer["result"]
            self.events.append(answer)

    def wait_event(self, method: str, session: str, since: int) -> dict:
        while True:
            for event in self.events[since:]:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event["params"]
            since = len(self.events)
            self.events.append(self._message())

    def open(self, url: str, width: int = 1200) -> tuple[str, int]:
        """A new tab at `url`, loaded and its images decoded; (session, index of its first event)."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session)
        self.send("Emulation.setDeviceMetricsOverride", session, width=width, height=900, deviceScaleFactor=1,
                  mobile=False)
        since = len(self.events)
        self.send("Page.navigate", session, url=url)
        self.wait_event("Page.loadEventFired", session, since)
        self.evaluate(session, "Promise.all([...document.images].map(i => i.decode().catch(() => null)))")
        return session, since

    def evaluate(self, session: str, expression: str):
        result = self.send("Runtime.evaluate", session, expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def problems(self, session: str, since: int, page: str) -> list[str]:
        """Console errors, uncaught exceptions, failed loads and any fetch besides the page and data: URIs."""
        out = []
        for e in (e for e in self.events[since:] if e.get("sessionId") == session):
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append("uncaught: " + d.get("exception", {}).get("description", d.get("text", "")))
            elif method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append("log: " + p["entry"]["text"])
            elif method == "Network.requestWillBeSent" and p["request"]["url"] != page and not p["request"][
                    "url"].startswith("data:"):
                out.append("fetched: " + p["request"]["url"])
            elif method == "Network.loadingFailed":
                out.append("failed: " + p["errorText"])
        return out

    def screenshot(self, session: str, clip: dict) -> "Image.Image":
        from PIL import Image

        data = self.send("Page.captureScreenshot", session, format="png", captureBeyondViewport=True,
                         clip={**clip, "scale": 1})["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except AssertionError:  # it may exit before it answers
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self._in)
        os.close(self._out)


TILES = """JSON.stringify([...document.querySelectorAll('#ID .t')].map(e => { const r = e.getBoundingClientRect();
  return {cls: e.className.split(' ')[1], tag: e.tagName, x: r.left + scrollX, y: r.top + scrollY, w: r.width,
          h: r.height, src: e.getAttribute('src'), drawn: e.tagName != 'IMG' || (e.complete && e.naturalWidth > 0)};
}))"""


def tiles_of(browser: Chromium, session: str, grid: str) -> list[dict]:
    return json.loads(browser.evaluate(session, TILES.replace("ID", grid)))


def rendered_as_thumbnails(shot, origin: tuple[float, float], tiles: list[dict], uris: list[str]) -> list[float]:
    """Per image tile, the mean absolute difference between the screenshot inside its 3-px border and the
    thumbnail its data: URI holds (0 = drawn exactly)."""
    from PIL import Image

    out = []
    for t, uri in zip(tiles, uris):
        want = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"), float)
        x, y = round(t["x"] - origin[0]) + 3, round(t["y"] - origin[1]) + 3
        got = np.asarray(shot.crop((x, y, x + want.shape[1], y + want.shape[0])), float)
        out.append(float(np.abs(got - want)[1:-1, 1:-1].mean()))
    return out


def border_colour(shot, origin, tile: dict) -> tuple[int, ...]:
    return shot.getpixel((round(tile["x"] - origin[0]) + 1, round(tile["y"] - origin[1] + tile["h"] / 2)))


def hex_rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])


@pytest.mark.slow
def test_report_loads_cleanly_and_its_thumbnails_render_in_chromium(curated, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium not installed (Debian package `chromium`; .ci/run installs it)")
    page = Path(write_report(str(curated), Storage(), ReportOptions(largest_clusters=3, small_clusters=4)))
    assert page == curated / "report.html" and not (curated / ".report.html.tmp").exists()
    html = page.read_text()
    stripped = tmp_path / "stripped.html"  # the same page with its thumbnails' data removed
    stripped.write_text(re.sub(r'src="data:[^"]*"', "", html))
    broken = tmp_path / "broken.html"  # planted faults: the checks below must see them
    broken.write_text(html.replace("</body>", '<img src="missing.png"><script>not_defined()</script></body>'))
    browser = Chromium(tmp_path)
    try:
        session, since = browser.open(page.as_uri())
        assert browser.problems(session, since, page.as_uri()) == []
        drawn = json.loads(browser.evaluate(session, "JSON.stringify([...document.images].map(i => i.complete "
                                                     "&& i.naturalWidth > 0))"))
        assert len(drawn) > 50 and all(drawn)
        height = browser.evaluate(session, "document.documentElement.scrollHeight")
        browser.screenshot(session, dict(x=0, y=0, width=1200, height=height)).save(tmp_path / "report.png")
        check_grid(browser, session, "grid-c0", {"kept", "duplicate", "balanced_out"})
        check_grid(browser, session, "grid-d0", {"kept", "duplicate"})
        session, _ = browser.open(stripped.as_uri())
        tiles = tiles_of(browser, session, "grid-c0")
        shot = browser.screenshot(session, clip_of(tiles))
        uris = re.findall(r'src="(data:[^"]*)"', html.split('id="grid-c0"')[1].split("</div>")[0])
        assert min(rendered_as_thumbnails(shot, (tiles[0]["x"], tiles[0]["y"]), tiles, uris)) > 20
        session, since = browser.open(broken.as_uri())
        found = browser.problems(session, since, broken.as_uri())
        assert any("not_defined" in p for p in found) and any("missing.png" in p for p in found), found
    finally:
        browser.close()


def clip_of(tiles: list[dict]) -> dict:
    x0, y0 = min(t["x"] for t in tiles), min(t["y"] for t in tiles)
    return dict(x=x0, y=y0, width=max(t["x"] + t["w"] for t in tiles) - x0,
                height=max(t["y"] + t["h"] for t in tiles) - y0)


def check_grid(browser: Chromium, session: str, grid: str, kinds: set[str]) -> None:
    """Every tile of `grid` is drawn as its thumbnail, inside the border colour of its kind."""
    tiles = tiles_of(browser, session, grid)
    assert tiles and all(t["tag"] == "IMG" and t["drawn"] for t in tiles) and {t["cls"] for t in tiles} == kinds
    clip = clip_of(tiles)
    shot = browser.screenshot(session, clip)
    assert np.asarray(shot, float).std() > 20  # not blank or uniform
    diffs = rendered_as_thumbnails(shot, (clip["x"], clip["y"]), tiles, [t["src"] for t in tiles])
    assert max(diffs) < 8, diffs
    for t in tiles:
        assert np.abs(np.array(border_colour(shot, (clip["x"], clip["y"]), t)) - hex_rgb(COLOURS[t["cls"]])).max() <= 2
