"""`shards inspect DEST`: what a shard set holds (counts, sizes, resolutions, formats, reject reasons).

A set written in several formats is summarised from its primary format (manifest.json); `outputs` lists
every format with its manifest, shard count and bytes."""
from __future__ import annotations

import json
import statistics
from collections import Counter

from mocostream.pipeline.filesystems import Storage

from .output import Destination
from .verify import read_manifest, tar_samples


def _spread(values: list[float]) -> dict:
    if not values:
        return {}
    return {"min": min(values), "median": statistics.median(values), "mean": round(statistics.fmean(values), 1),
            "max": max(values)}


def _metas(dest: Destination, entry: dict) -> list[dict]:
    data = dest.read(entry["name"]) or b""
    if entry["name"].endswith(".parquet"):
        import io

        import pyarrow.parquet as pq
        t = pq.read_table(io.BytesIO(data), columns=["width", "height", "ext", "label"])
        return [{"width": r["width"], "height": r["height"], "format": r["ext"], "label": r["label"]}
                for r in t.to_pylist()]
    return [json.loads(parts.get("json", b"{}")) for _, parts in tar_samples(data)]


def inspect(url: str, storage: Storage | None = None) -> dict:
    """What the set at `url` holds; `storage`: how it is read (default: the default settings)."""
    dest = Destination(url, create=False, storage=storage or Storage())
    m = read_manifest(dest)
    widths, heights, formats, labels = [], [], Counter(), Counter()
    for entry in m["shards"]:
        for meta in _metas(dest, entry):
            widths.append(meta.get("width", 0))
            heights.append(meta.get("height", 0))
            formats[meta.get("format", "?")] += 1
            labels[meta.get("label", "")] += 1
    sizes = [e["bytes"] for e in m["shards"]]
    outputs = {}
    for fmt, name in m.get("formats", {m.get("format"): "manifest.json"}).items():
        other = m if name == "manifest.json" else json.loads(dest.read(name) or b'{"shards": []}')
        outputs[fmt] = {"manifest": name, "shards": len(other["shards"]), "bytes": other.get("total_bytes", 0)}
    return {
        "location": dest.url,
        "format": m.get("format"),
        "outputs": outputs,
        "shards": len(m["shards"]),
        "samples": m.get("total_samples"),
        "inputs": m.get("inputs"),
        "bytes": m.get("total_bytes"),
        "shard_bytes": _spread(sizes),
        "shard_samples": _spread([e["samples"] for e in m["shards"]]),
        "width": _spread(widths),
        "height": _spread(heights),
        "formats": dict(formats.most_common()),
        "labels": len(labels),
        "rejected": m.get("rejected", 0),
        "rejected_by_reason": m.get("rejected_by_reason", {}),
        "options": {k: v for k, v in m.get("options", {}).items() if k not in ("fingerprint",)},
    }


def _mb(n) -> str:
    return f"{n / 1e6:.1f} MB"


def summary_text(info: dict) -> str:
    sb, w, h = info["shard_bytes"], info["width"], info["height"]
    outputs = info.get("outputs", {})
    lines = [
        f"{info['location']}: {' + '.join(outputs) or info['format']} shard set",
        f"  samples   {info['samples']} in {info['shards']} shards, {_mb(info['bytes'] or 0)}"
        + (f" (inputs {info['inputs']}, rejected {info['rejected']})" if info.get("inputs") is not None else ""),
    ]
    if len(outputs) > 1:
        lines.append("  outputs   " + ", ".join(f"{f}: {o['shards']} shards, {_mb(o['bytes'])} ({o['manifest']})"
                                                for f, o in outputs.items()))
    if sb:
        lines.append(f"  shards    {_mb(sb['min'])} .. {_mb(sb['max'])} (mean {_mb(sb['mean'])}); samples "
                     f"{info['shard_samples']['min']} .. {info['shard_samples']['max']}")
    if w:
        lines.append(f"  width     min {w['min']}  median {w['median']}  max {w['max']}")
        lines.append(f"  height    min {h['min']}  median {h['median']}  max {h['max']}")
    lines.append("  formats   " + (", ".join(f"{k} {v}" for k, v in info["formats"].items()) or "-"))
    lines.append(f"  labels    {info['labels']} distinct")
    lines.append("  rejected  " + (", ".join(f"{k} {v}" for k, v in info["rejected_by_reason"].items()) or "none"))
    return "\n".join(lines)
