"""URL ingest, side by side: `mocostream shards create` vs img2dataset on the same URL list and server.

    python bench/ingest.py                         # installs img2dataset into its own venv first
    python bench/ingest.py --scenarios one-host,eight-hosts,limited --rounds 2 --memory-lines 0

The server is tests/webserver.py on loopback addresses, in this process, serving ../shared/data/webphotos.tar.gz's
photos under `--urls` URLs. Scenarios (`--scenarios`):
  one-host     every URL on one healthy host (no failures), answered after `--host-latency` (0.2 s): how many
               connections a tool dares to open to one fast host
  eight-hosts  spread over 8 loopback addresses (127.0.0.1-8, one listener each) standing in for a web list's
               many hosts, with a failure mix (3 % 404, 1 % connection reset, 1 % 503 with Retry-After: 1 then
               the image, 2 % answered 1 s late, 0.25 % hanging past the timeout), at each of `--latencies`
  limited      one host that answers 429 at once to any request beyond `--limit` (8) concurrent ones (no
               Retry-After), otherwise healthy, after `--host-latency`: how politely a tool finds the limit
Both tools get the same work: 2 processes (ours: 2 decode workers; img2dataset: 2 processes x 32 threads),
centre crop to 256 px, JPEG q95, tar (webdataset) output, 10 s timeout, 2 retries, X-Robots-Tag honoured;
ours with `--io-concurrency 64 --dedup none` (img2dataset does not deduplicate) and its default adaptive
per-host connections (`--allow-private-addresses`: the server is on loopback).
img2dataset 1.47 is installed from the package index into its own venv (--i2d-venv), never into ours.
Per run: URLs/s = URLs / wall time of the whole command (start-up included); CPU s per written image = user +
system time of the command's process tree (os.wait4) / images written; the server's peak of concurrent
requests, its requests and how many it answered 429 for a concurrency limit; the process tree's peak RSS (the
largest process; ours also reports its main process's); the 1-minute load average after the run (the machine
may be shared). Rounds alternate the order of the two tools. Then the memory check: ours on one --part of a
`--memory-lines` list and of a list 10x shorter, the same number of URLs per part; the main process's
peak RSS must not depend on the list's length. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from webserver import WebServer, mix  # noqa: E402

MIX = {"404": 0.03, "reset": 0.01, "503": 0.01, "slow": 0.02, "hang": 0.0025}
HOSTS = 8


def photos(limit: int = 500) -> list[bytes]:
    out = []
    with tarfile.open(REPO.parent / "shared" / "data" / "webphotos.tar.gz") as tf:
        for m in tf:
            if m.isfile() and m.name.endswith(".jpg") and len(out) < limit:
                out.append(tf.extractfile(m).read())
    return out


def ensure_img2dataset(venv: Path) -> Path:
    exe = venv / "bin" / "img2dataset"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "img2dataset==1.47.0"], check=True)
    return exe


def run_tree(cmd: list[str], env: dict | None = None) -> dict:
    """Like subprocess.run, with the child's rusage from wait4 (its whole waited-for tree)."""
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.execve(cmd[0], cmd, env or dict(os.environ))
    _, status, usage = os.wait4(pid, 0)
    return {"wall": time.monotonic() - start, "rc": os.waitstatus_to_exitcode(status),
            "cpu": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}


def ours(urls: Path, out: Path, part: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "mocostream.ops.cli", "shards", "create", str(urls), "--out", str(out), "--workers", "2",
           "--io-concurrency", "64", "--max-size", "256", "--resize-mode", "center_crop", "--quality", "95",
           "--http-timeout", "10", "--retries", "2", "--dedup", "none", "--allow-private-addresses", "--quiet", "--json"]
    cmd += ["--part", part] if part else []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = run_tree(cmd, env)
    folder = out / (f"part-{int(part.split('/')[0]):05d}-of-{int(part.split('/')[1]):05d}" if part else "")
    report = json.loads((folder / "report.json").read_text())
    r.update(written=report["written"], inputs=report["inputs"], main_peak_rss_mib=report["peak_rss_bytes"] / 2**20)
    return r


def img2dataset(exe: Path, urls: Path, out: Path) -> dict:
    cmd = [str(exe), "--url_list", str(urls), "--output_folder", str(out), "--processes_count", "2",
           "--thread_count", "32", "--image_size", "256", "--resize_mode", "center_crop", "--output_format",
           "webdataset", "--timeout", "10", "--retries", "2", "--encode_quality", "95",
           "--number_sample_per_shard", "1000", "--distributor", "multiprocessing"]
    r = run_tree(cmd, {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    r.update(written=sum(s["successes"] for s in stats), inputs=sum(s["count"] for s in stats))
    return r


def one(tool: str, srv: WebServer, urls: Path, work: Path, exe: Path) -> dict:
    out = work / f"out-{tool}"
    shutil.rmtree(out, ignore_errors=True)
    srv.reset_counts()
    r = ours(urls, out) if tool == "mocostream" else img2dataset(exe, urls, out)
    r.update(tool=tool, urls_per_s=r["inputs"] / r["wall"], cpu_per_image=r["cpu"] / max(r["written"], 1),
             server_peak=srv.peak, server_requests=srv.requests, refused_429=srv.refused,
             load_1min=os.getloadavg()[0])
    shutil.rmtree(out, ignore_errors=True)
    return r


def memory_check(srv: WebServer, work: Path, lines: int, per_part: int) -> list[dict]:
    """Ours on one part of a `lines`-line list and of a 10x shorter one, `per_part` URLs per part."""
    res = []
    for n in (lines // 10, lines):
        path = work / f"list-{n}.txt"
        with open(path, "w") as f:
            for start in range(0, n, 100_000):
                f.write("".join(f"{srv.urls[i % HOSTS]}/ok/{i}.jpg\n" for i in range(start, min(n, start + 100_000))))
        parts = n // per_part
        r = ours(path, work / f"mem-{n}", f"{parts // 2}/{parts}")
        res.append({"lines": n, "part": f"{parts // 2}/{parts}", **{k: r[k] for k in ("wall", "written", "main_peak_rss_mib")}})
        path.unlink()
        shutil.rmtree(work / f"mem-{n}", ignore_errors=True)
    return res


def url_list(path: Path, srv: WebServer, n: int, rates: dict) -> Path:
    path.write_text("".join(f"{srv.urls[i % len(srv.urls)]}/{k}/{i}.jpg\n" for i, k in enumerate(mix(n, rates, seed=1))))
    return path


def settings(a) -> list[dict]:
    """(scenario, latency, hosts, failure mix, concurrency limit) of each server set-up to run."""
    out = []
    for name in a.scenarios.split(","):
        if name == "one-host":
            out.append(dict(scenario=name, latency=a.host_latency, hosts=1, mix={}, limit=0))
        elif name == "eight-hosts":
            out += [dict(scenario=name, latency=float(x), hosts=HOSTS, mix={**MIX, "hang": a.hang_rate}, limit=0)
                    for x in a.latencies.split(",")]
        elif name == "limited":
            out.append(dict(scenario=name, latency=a.host_latency, hosts=1, mix={}, limit=a.limit))
        else:
            raise SystemExit(f"unknown scenario {name!r} (one-host, eight-hosts, limited)")
    return out


def report(r: dict) -> str:
    share = r["refused_429"] / max(r["server_requests"], 1)
    return (f"{r['scenario']:11s} latency {r['latency'] * 1000:.0f} ms round {r['round']} {r['tool']:12s} "
            f"{r['urls_per_s']:6.1f} URLs/s {r['cpu_per_image'] * 1000:6.1f} CPU ms/img written "
            f"{r['written']}/{r['inputs']} server: peak {r['server_peak']}, {r['server_requests']} requests, "
            f"{r['refused_429']} answered 429 ({100 * share:.1f} %); peak RSS {r['peak_rss_mib']:.0f} MiB"
            + (f" (main {r['main_peak_rss_mib']:.0f} MiB)" if "main_peak_rss_mib" in r else "")
            + f"; load {r['load_1min']:.1f}")


def summary(results: list[dict]) -> list[str]:
    """Per set-up: our mean URLs/s over img2dataset's, and each tool's share of requests answered 429."""
    lines = []
    for key in dict.fromkeys((r["scenario"], r["latency"]) for r in results):
        runs = [r for r in results if (r["scenario"], r["latency"]) == key]
        mean = {t: sum(r["urls_per_s"] for r in runs if r["tool"] == t) / max(1, sum(r["tool"] == t for r in runs))
                for t in ("mocostream", "img2dataset")}
        share = {t: sum(r["refused_429"] for r in runs if r["tool"] == t) /
                 max(1, sum(r["server_requests"] for r in runs if r["tool"] == t)) for t in mean}
        lines.append(f"{key[0]} latency {key[1] * 1000:.0f} ms: mocostream {mean['mocostream']:.1f} URLs/s, "
                     f"img2dataset {mean['img2dataset']:.1f} ({mean['mocostream'] / max(mean['img2dataset'], 1e-9):.2f}x); "
                     f"answered 429: {100 * share['mocostream']:.2f} % vs {100 * share['img2dataset']:.2f} %")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--urls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--scenarios", default="one-host,eight-hosts,limited", help="comma-separated (see above)")
    ap.add_argument("--latencies", default="0,0.2", help="eight-hosts: seconds per request, comma-separated")
    ap.add_argument("--host-latency", type=float, default=0.2, help="one-host and limited: seconds per request")
    ap.add_argument("--limit", type=int, default=8, help="limited: concurrent requests answered; more get 429")
    ap.add_argument("--hang-rate", type=float, default=MIX["hang"],
                    help="share of URLs hanging past the timeout (each costs ~3 x 10 s: the run's tail)")
    ap.add_argument("--memory-lines", type=int, default=10_000_000, help="0 skips the memory check")
    ap.add_argument("--memory-part-urls", type=int, default=10_000)
    ap.add_argument("--work", default="/tmp/mocostream-bench-ingest")
    ap.add_argument("--i2d-venv", default="/tmp/mocostream-bench-ingest/venv-img2dataset")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    exe = ensure_img2dataset(Path(a.i2d_venv))
    results, images = [], photos()
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    for setup in settings(a):
        with WebServer(images, latency=setup["latency"], hang=60.0, hosts=setup["hosts"]) as srv:
            srv.slow, srv.max_active = 1.0, setup["limit"]
            urls = url_list(work / "urls.txt", srv, a.urls, setup["mix"])
            for rnd in range(a.rounds):
                order = ("mocostream", "img2dataset") if rnd % 2 == 0 else ("img2dataset", "mocostream")
                for tool in order:
                    r = one(tool, srv, urls, work, exe)
                    r.update(round=rnd, **{k: setup[k] for k in ("scenario", "latency", "hosts", "limit")})
                    results.append(r)
                    print(report(r), flush=True)
    for line in summary(results):
        print(line, flush=True)
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    memory = []
    if a.memory_lines:
        with WebServer(images, hosts=HOSTS) as srv:
            memory = memory_check(srv, work, a.memory_lines, a.memory_part_urls)
        for m in memory:
            print(f"memory: part {m['part']} of a {m['lines']:,}-line list: {m['written']} written in "
                  f"{m['wall']:.0f} s, main process peak RSS {m['main_peak_rss_mib']:.0f} MiB", flush=True)
    print(json.dumps({"runs": results, "memory": memory}))


if __name__ == "__main__":
    main()
