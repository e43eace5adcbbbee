"""`shards merge DEST`: join the manifests that `--part i/N` runs wrote under DEST into one.

`create --part i/N --out DEST` writes into `DEST/part-IIIII-of-NNNNN/` (its own manifest, stats and
rejects, so each host resumes independently). merge checks that all N parts are complete and were made
with the same options, then writes DEST/manifest.json listing every part's shards under their relative
names (`part-00000-of-00004/shard-000000.tar`, readable by pipeline/ as they are: nothing is copied),
DEST/rejects.jsonl (all parts, in part order) and DEST/report.json. Parts written in several formats
merge into one manifest per format (manifest.json + manifest-<fmt>.json, as create writes them).
"""
from __future__ import annotations

import hashlib
import json
import re

from mocostream.pipeline.filesystems import Storage

from .errors import ShardError
from .manifest import build_manifest, json_bytes, manifest_names, write_manifests
from .output import Destination

PART_DIR = re.compile(r"^part-(\d{5})-of-(\d{5})$")


def part_dir(i: int, n: int) -> str:
    return f"part-{i:05d}-of-{n:05d}"


def _parts(dest: Destination) -> list[tuple[int, int, str]]:
    try:
        listed = dest.call(f"list {dest.url}", lambda: dest.fs.ls(dest.root, detail=False))
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in listed]
    except FileNotFoundError:
        names = []
    found = sorted((int(m.group(1)), int(m.group(2)), name) for name in names if (m := PART_DIR.match(name)))
    if not found:
        raise ShardError(f"no part-IIIII-of-NNNNN folders in {dest.url}: run `shards create --part i/N` first")
    return found


def merge(url: str, storage: Storage | None = None) -> dict:
    """Join the parts' manifests at `url`; `storage`: how it is read and written (default: the default settings)."""
    dest = Destination(url, storage=storage or Storage())
    parts = _parts(dest)
    counts = {n for _, n, _ in parts}
    if len(counts) != 1:
        raise ShardError(f"parts of different splits in {dest.url}: {sorted(counts)}")
    n = counts.pop()
    missing = sorted(set(range(n)) - {i for i, _, _ in parts})
    manifests = []
    for i, _, name in parts:
        raw = dest.read(f"{name}/manifest.json")
        if raw is None:
            missing.append(i)
        else:
            manifests.append((name, json.loads(raw)))
    if missing:
        raise ShardError(f"parts not finished yet: {', '.join(part_dir(i, n) for i in sorted(set(missing)))} "
                         f"(rerun `shards create --part i/{n}` for them)")
    base = {k: v for k, v in manifests[0][1]["options"].items() if k not in ("part", "fingerprint")}
    for name, m in manifests:
        opts = {k: v for k, v in m["options"].items() if k not in ("part", "fingerprint")}
        if opts != base:
            diff = [k for k in sorted(set(opts) | set(base)) if opts.get(k) != base.get(k)]
            raise ShardError(f"{name} was made with other options than {manifests[0][0]} ({', '.join(diff)})")
    formats = list(manifests[0][1].get("formats", {manifests[0][1]["format"]: "manifest.json"}))
    names = manifest_names(formats)
    shards: dict[str, list[dict]] = {f: [] for f in formats}
    rejects, bytes_in, seconds = b"", 0, 0.0
    for name, m in manifests:
        for fmt in formats:
            part_m = m if names[fmt] == "manifest.json" else json.loads(dest.read(f"{name}/{names[fmt]}") or b"null")
            if part_m is None:
                raise ShardError(f"{name}/{names[fmt]} is missing: rerun that part")
            for e in part_m["shards"]:
                shards[fmt].append({**e, **{k: f"{name}/{e[k]}" for k in ("name", "index", "stats") if k in e}})
        rejects += dest.read(f"{name}/rejects.jsonl") or b""
        report = json.loads(dest.read(f"{name}/report.json") or b"{}")
        bytes_in += report.get("bytes_in", 0)
        seconds = max(seconds, m.get("seconds", 0.0))
    rejected = [(r["source"], r["reason"], r["detail"]) for r in map(json.loads, rejects.decode().splitlines())]
    fp = hashlib.sha256("".join(m["options"]["fingerprint"] for _, m in manifests).encode()).hexdigest()
    options = {**base, "part": f"merged {n}", "fingerprint": fp}
    # the union of the parts' classes; unknown when a part did not record them
    classes = (sorted(set().union(*(m["classes"] for _, m in manifests)))
               if all("classes" in m for _, m in manifests) else None)
    merged = {f: build_manifest(f, options, shards[f], rejected, seconds, inputs=sum(m["inputs"] for _, m in manifests),
                                formats=formats, classes=classes) for f in formats}
    manifest = merged[formats[0]]
    report = {"parts": n, "inputs": manifest["inputs"], "written": manifest["total_samples"],
              "rejected": manifest["rejected"], "rejected_by_reason": manifest["rejected_by_reason"],
              "shards": len(manifest["shards"]), "bytes_in": bytes_in, "bytes_out": manifest["total_bytes"],
              "manifest": dest.location("manifest.json")}
    dest.write_bytes("rejects.jsonl", rejects)
    dest.write_bytes("report.json", json_bytes(report))
    write_manifests(dest, names, merged)  # manifest.json last
    dest.close()
    return report
