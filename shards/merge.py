"""`shards merge DEST`: join the manifests that `--part i/N` runs wrote under DEST into one.

`create --part i/N --out DEST` writes into `DEST/part-IIIII-of-NNNNN/` (its own manifest, stats and
rejects, so each host resumes independently). merge checks that all N parts are complete, that each is
the part its folder names (its recorded `part`), that all were made with the same options from the same
inputs (`source_ids`: size and digest of each table, recorded at create time), and that no sample key
occurs in two parts (shards.overlap: reads each part's stats files, twice if hashes match). Then it writes
DEST/manifest.json listing every part's shards under their relative names
(`part-00000-of-00004/shard-000000.tar`, readable by pipeline/ as they are: nothing is copied),
DEST/rejects.jsonl (all parts, in part order) and DEST/report.json. Parts written in several formats merge
into one manifest per format (manifest.json + manifest-<fmt>.json, as create writes them).
"""
from __future__ import annotations

import functools
import hashlib
import json
import re

from mocostream.pipeline.filesystems import Storage

from .errors import ShardError
from .manifest import build_manifest, json_bytes, manifest_names, write_manifests
from .output import Destination
from .overlap import part_keys, shared_keys
from .rejects import parse as parse_rejects
from .stats import stats_name

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


SAME_PER_PART = ("part", "fingerprint", "source_ids")  # compared on their own below


def _check_parts(manifests: list[tuple[str, dict]], n: int) -> dict:
    """Each part is the one its folder names, made with the same options from the same inputs; the shared
    options."""
    first, m0 = manifests[0]
    base = {k: v for k, v in m0["options"].items() if k not in SAME_PER_PART}
    ids = next((m["options"]["source_ids"] for _, m in manifests if "source_ids" in m["options"]), None)
    for name, m in manifests:
        opts = {k: v for k, v in m["options"].items() if k not in SAME_PER_PART}
        if opts != base:
            diff = [k for k in sorted(set(opts) | set(base)) if opts.get(k) != base.get(k)]
            raise ShardError(f"{name} was made with other options than {first} ({', '.join(diff)})")
        i = int(PART_DIR.match(name).group(1))
        if m["options"].get("part") != f"{i}/{n}":
            raise ShardError(f"{name} holds part {m['options'].get('part')} (its manifest says so), not {i}/{n}: "
                             "a part folder copied or renamed? Rerun `shards create --part "
                             f"{i}/{n}` into a clean {name}")
        got = m["options"].get("source_ids")
        if got is not None and got != ids:
            which = [s for s, a, b in zip(base.get("sources", []), got, ids) if a != b]
            raise ShardError(f"{name} was made from other input files than the other parts, under the same "
                             f"name(s): {', '.join(which) or 'sources'} (size or content differ); rerun it with "
                             "the same inputs")
    return base


def _check_keys(dest: Destination, manifests: list[tuple[str, dict]], reject_keys: dict[str, list[str]]) -> None:
    """No sample key in two parts (a part folder copied over another, edited manifests)."""
    parts = [(name, functools.partial(part_keys, dest, name, [e.get("stats") or stats_name(e["name"])
                                                              for e in m["shards"]], reject_keys[name]))
             for name, m in manifests]
    try:
        shared, involved = shared_keys(parts)
    except FileNotFoundError as exc:
        raise ShardError(f"{exc}: a stats file of a part is missing; rerun that part") from None
    if shared:
        raise ShardError(f"{shared} sample key(s) occur in more than one part ({', '.join(involved)}): the parts "
                         "overlap (a part folder copied over another?); rerun those parts into clean folders")


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
    base = _check_parts(manifests, n)
    formats = list(manifests[0][1].get("formats", {manifests[0][1]["format"]: "manifest.json"}))
    names = manifest_names(formats)
    shards: dict[str, list[dict]] = {f: [] for f in formats}
    rejects, bytes_in, seconds, rejected, reject_keys = b"", 0, 0.0, [], {}
    for name, m in manifests:
        for fmt in formats:
            part_m = m if names[fmt] == "manifest.json" else json.loads(dest.read(f"{name}/{names[fmt]}") or b"null")
            if part_m is None:
                raise ShardError(f"{name}/{names[fmt]} is missing: rerun that part")
            for e in part_m["shards"]:
                shards[fmt].append({**e, **{k: f"{name}/{e[k]}" for k in ("name", "index", "stats") if k in e}})
        part_rejects = dest.read(f"{name}/rejects.jsonl") or b""
        records = parse_rejects(part_rejects, dest.location(f"{name}/rejects.jsonl"))
        rejected += [tuple(r[:3]) for r in records]
        reject_keys[name] = [r[3]["key"] for r in records if r[3].get("key")]
        rejects += part_rejects
        report = json.loads(dest.read(f"{name}/report.json") or b"{}")
        bytes_in += report.get("bytes_in", 0)
        seconds = max(seconds, m.get("seconds", 0.0))
    _check_keys(dest, manifests, reject_keys)
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
