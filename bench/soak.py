"""URL ingest soak: `mocostream shards create` on a long URL list with full-size images and a web's failure mix;
it must finish, in a bounded time, with every URL accounted for by its expected outcome.

    python bench/soak.py                  # 20,000 URLs
    python bench/soak.py --urls 2000      # what the slow test runs

The server is tests/webserver.py in this process, on 8 loopback addresses (127.0.0.1-8, one listener each:
8 hosts to the downloader's per-host limits). Every answer comes after 200 ms; of the URLs, 5 % answer 404,
2 % reset the connection, 1 % answer after 5 s, 5 % answer a first 503 with Retry-After: 1 (then the image),
2 % carry X-Robots-Tag: noai; the rest are images, served as they are from ../shared/data/webphotos.tar.gz
(all of `jpg/`, ~500x375, and `jpg_large/`, ~1024x768), stored as they come (no resize). The command:
`--workers 2 --dedup none`, tar output, default HTTP options, run under tests/deadlock.py's watcher (a bound
on the wall time; a send-send deadlock is reported at once, with every process's kernel and Python stacks).
Expected: 404 -> http_error, reset -> connection, noai -> opted_out, everything else written; checked per URL
against rejects.jsonl and in total against report.json (written + rejected = inputs).
Printed: URLs/s (wall time of the whole command, start-up included), the main process's peak RSS (its own
getrusage, from report.json), the process tree's peak memory (sampled every 0.5 s: sum of RSS, sum of PSS),
the load average before and after (the machine may be shared), the CPU model. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from deadlock import run_watched  # noqa: E402
from webserver import WebServer, mix  # noqa: E402

HOSTS = 8
LATENCY = 0.2          # seconds before every answer
SLOW = 5.0             # seconds of a slow answer, all told
MIX = {"404": 0.05, "reset": 0.02, "slow": 0.01, "503": 0.05, "optout": 0.02}
EXPECTED = {"404": "http_error", "reset": "connection", "optout": "opted_out"}  # the other kinds: written


def photos() -> list[bytes]:
    """Every photo of webphotos jpg/ and jpg_large/, in archive order."""
    out = []
    with tarfile.open(REPO.parent / "shared" / "data" / "webphotos.tar.gz") as tf:
        for m in tf:
            if m.isfile() and m.name.lstrip("./").startswith(("jpg/", "jpg_large/")) and m.name.endswith(".jpg"):
                out.append(tf.extractfile(m).read())
    return out


def loopback_flags() -> list[str]:
    """The flag that lets a run fetch from loopback servers, where the tool has one."""
    p = run_watched([sys.executable, "-m", "mocostream.ops.cli", "shards", "create", "--help"], cwd=str(REPO))
    return ["--allow-private-addresses"] if "--allow-private-addresses" in p.stdout else []


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def check(kinds: list[str], urls: list[str], out: Path) -> dict:
    """Every URL's outcome against its kind: {"mismatches": [...], "expected": Counter, "got": Counter}."""
    rejects = {}
    for line in (out / "rejects.jsonl").read_text().splitlines():
        r = json.loads(line)
        rejects[r["url"]] = r["reason"]
    expected = Counter(EXPECTED.get(k, "written") for k in kinds)
    got = Counter(rejects.get(u, "written") for u in urls)
    mismatches = [(u, k, rejects.get(u, "written")) for u, k in zip(urls, kinds)
                  if rejects.get(u, "written") != EXPECTED.get(k, "written")]
    return {"expected": dict(sorted(expected.items())), "got": dict(sorted(got.items())),
            "mismatches": mismatches[:20], "mismatch_count": len(mismatches)}


def soak(n: int, work: Path, bound: float | None = None, seed: int = 26) -> dict:
    """Run the soak on `n` URLs in `work`; the figures and the per-URL check."""
    bound = bound if bound is not None else 120 + 0.1 * n  # >= 10 URLs/s; a healthy run does many times that
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    kinds = mix(n, MIX, seed=seed)
    flags = loopback_flags()
    with WebServer(photos(), latency=LATENCY, hosts=HOSTS) as srv:
        srv.slow = SLOW - LATENCY
        urls = [f"{srv.urls[i % HOSTS]}/{k}/{i}.jpg" for i, k in enumerate(kinds)]
        (work / "urls.txt").write_text("".join(u + "\n" for u in urls))
        cmd = [sys.executable, "-m", "mocostream.ops.cli", "shards", "create", str(work / "urls.txt"), "--out",
               str(out), "--workers", "2", "--dedup", "none", "--quiet", "--json", *flags]
        load_before, start = load(), time.monotonic()
        p = run_watched(cmd, bound=bound, cwd=str(REPO))
        wall = time.monotonic() - start
        requests = srv.requests
    if p.returncode != 0:
        raise RuntimeError(f"exit {p.returncode}: {p.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"urls": n, "wall_s": round(wall, 1), "bound_s": bound, "urls_per_s": round(n / wall, 1),
            "inputs": report["inputs"], "written": report["written"],
            "rejected_by_reason": report["rejected_by_reason"], "server_requests": requests,
            "main_peak_rss_bytes": report["peak_rss_bytes"], **p.memory.as_dict(),
            "check": check(kinds, urls, out), "load_before": load_before, "load_after": load(),
            "cpu": _cpu_model(), "cores": os.cpu_count()}


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--urls", type=int, default=20_000)
    ap.add_argument("--bound", type=float, default=None, help="seconds the run may take (default 120 + 0.1/URL)")
    ap.add_argument("--work", default="/tmp/mocostream-bench-soak")
    a = ap.parse_args()
    r = soak(a.urls, Path(a.work), a.bound)
    mib = 1 << 20
    print(f"soak: {r['urls']:,} URLs in {r['wall_s']:.0f} s ({r['urls_per_s']:.1f} URLs/s), written {r['written']:,}, "
          f"rejected {r['rejected_by_reason']}, outcome mismatches {r['check']['mismatch_count']}; "
          f"main peak RSS {r['main_peak_rss_bytes'] / mib:.0f} MiB, tree peak RSS sum "
          f"{r['tree_peak_rss_sum_bytes'] / mib:.0f} MiB (PSS sum {r['tree_peak_pss_sum_bytes'] / mib:.0f} MiB, "
          f"{r['processes']} processes); load {r['load_before']} -> {r['load_after']}; {r['cpu']}", flush=True)
    print(json.dumps(r))
    shutil.rmtree(Path(a.work) / "out", ignore_errors=True)
    sys.exit(0 if r["check"]["mismatch_count"] == 0 and r["written"] + sum(r["rejected_by_reason"].values())
             == r["inputs"] == r["urls"] else 1)


if __name__ == "__main__":
    main()
