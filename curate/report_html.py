"""The report as one self-contained HTML page: inline CSS, plots as inline SVG, thumbnails as data: URIs; no
script, font or anything else fetched, so it opens from a laptop's disk, a bucket or a mail attachment alike.
Every string from the data (keys, shard URLs, reasons, report.json values) is HTML-escaped."""
from __future__ import annotations

import math
from html import escape

import numpy as np

from .report_images import Thumb
from .report_scan import Counts, Samples

# Border colour per reason; any other dropping reason is drawn as a duplicate is (red).
COLOURS = {"kept": "#1a9850", "duplicate": "#d73027", "balanced_out": "#fd8d3c"}
LABELS = {"kept": "kept", "duplicate": "dropped: duplicate", "balanced_out": "dropped: balanced out"}

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;padding:0 16px;color:#222;background:#fff;max-width:1180px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;margin-top:36px;border-bottom:1px solid #ccc}
h3{font-size:15px;margin:18px 0 4px}.meta{color:#555;font-weight:normal}.warn{color:#a50026;font-weight:bold}
table{border-collapse:collapse;margin:8px 0}td,th{padding:2px 12px;text-align:right;border-bottom:1px solid #eee}
th:first-child,td:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:6px;align-items:center;padding:6px;background:#f4f4f4;margin:4px 0}
.cards{display:flex;flex-wrap:wrap;gap:0 24px;align-items:flex-start}.cards h3{margin-top:10px}
.t{border-width:3px;border-style:solid;display:block}span.t{width:64px;height:64px;background:#ddd;color:#666;
text-align:center;line-height:64px;font-size:22px}.legend i{display:inline-block;width:10px;height:10px;
border-width:3px;border-style:solid;margin:0 4px 0 14px;vertical-align:middle}
""" + "".join(f".{name}{{border-color:{colour}}}" for name, colour in COLOURS.items())


def _n(value) -> str:
    return f"{int(value):,}"


def _pct(part, whole) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def reason_class(reason: str | None, kept: bool) -> str:
    return "kept" if kept else reason if reason in COLOURS and reason != "kept" else "duplicate"


def tile(row: dict, thumbs: dict[tuple[str, int], Thumb]) -> str:
    """One thumbnail with its border colour; key, reason and position on hover."""
    kept = bool(row["kept"])
    cls = reason_class(row.get("reason"), kept)
    why = "kept" if kept else f"dropped: {row.get('reason')}" + (f" of {row['dup_of']}" if row.get("dup_of") else "")
    thumb = thumbs.get((row["shard"], int(row["member"])), Thumb(None, error="not read"))
    title = f"{row['key']}\n{why}\n{row['shard']} #{row['member']}"
    if thumb.uri is None:
        title += f"\nno thumbnail: {thumb.error}"
        return f'<span class="t {cls}" title="{escape(title)}">?</span>'
    return (f'<img class="t {cls}" width="{thumb.width}" height="{thumb.height}" alt="" title="{escape(title)}" '
            f'src="{thumb.uri}">')


def legend() -> str:
    return '<p class="legend meta">' + "".join(
        f'<i class="{name}"></i>{escape(label)}' for name, label in LABELS.items()) + "; hover for key and reason</p>"


def header(info: dict, dest: str) -> str:
    embed = info.get("embed") or {}
    embed_text = ", ".join(f"{k}: {v}" for k, v in embed.items()) if isinstance(embed, dict) else str(embed)
    facts = [("data", dest), ("levels (finest first)", " / ".join(map(str, info.get("levels", [])))),
             ("keep fraction", info.get("keep_fraction")), ("dedup eps", info.get("dedup_eps")),
             ("embedding", embed_text), ("fingerprint", info.get("fingerprint"))]
    rows = "".join(f"<tr><td>{escape(k)}</td><td style='text-align:left'>{escape(str(v))}</td></tr>"
                   for k, v in facts if v not in (None, ""))
    return f"<h1>Curation report</h1><table>{rows}</table>"


def counts_section(info: dict, counts: Counts) -> str:
    """Inputs, kept and dropped per reason as report.json states them, beside the selection's own rows."""
    inputs, dropped = info.get("inputs", 0), info.get("dropped") or {}
    rows = [("inputs", inputs, counts.rows), ("kept", info.get("kept", 0), counts.reasons.get("kept", 0))]
    rows += [(f"dropped: {r}", n, counts.reasons.get(r, 0)) for r, n in dropped.items()]
    rows += [(f"(selection only) {r}", 0, n) for r, n in sorted(counts.reasons.items())
             if r != "kept" and r not in dropped]
    body = "".join(f"<tr><td>{escape(name)}</td><td>{_n(n)}</td><td>{_pct(n, inputs)}</td><td>{_n(rows_n)}</td></tr>"
                   for name, n, rows_n in rows)
    out = ("<h2>Counts per stage and reason</h2><table><tr><th></th><th>report.json</th><th>of inputs</th>"
           f"<th>selection.parquet rows</th></tr>{body}</table>" + stack_bar(info))
    if any(n != rows_n for _, n, rows_n in rows):
        out += '<p class="warn">report.json and selection.parquet disagree (see the table)</p>'
    if counts.unclustered:
        out += f'<p class="warn">{_n(counts.unclustered)} rows have no valid finest cluster id</p>'
    return out


def stack_bar(info: dict, width: int = 640, height: int = 22) -> str:
    parts = [("kept", info.get("kept", 0))] + list((info.get("dropped") or {}).items())
    total = sum(n for _, n in parts) or 1
    x, rects = 0.0, []
    for name, n in parts:
        w = width * n / total
        colour = COLOURS.get(name, COLOURS["duplicate"])
        rects.append(f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="{height}" fill="{colour}">'
                     f"<title>{escape(name)}: {_n(n)}</title></rect>")
        x += w
    return f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}">{"".join(rects)}</svg>'


def _log_axis(top: int) -> int:
    return max(1, math.ceil(math.log10(max(top, 10))))


def sizes_svg(before: np.ndarray, after: np.ndarray, width: int = 640, height: int = 300) -> str:
    """Cluster sizes sorted largest first against their rank, both axes log scale, before and after selection
    (each curve from its own non-empty clusters; at most ~400 points per curve, at log-spaced ranks)."""
    left, right, top, bottom = 56, 16, 12, 40
    pw, ph = width - left - right, height - top - bottom
    curves = {name: np.sort(a[a > 0])[::-1] for name, a in (("before", before), ("after", after))}
    xdec = _log_axis(max(len(c) for c in curves.values()))
    ydec = _log_axis(int(max((c[0] for c in curves.values() if len(c)), default=1)))

    def px(rank, size):
        return left + pw * math.log10(rank) / xdec, top + ph * (1 - math.log10(size) / ydec)

    parts = [f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for d in range(xdec + 1):
        x, _ = px(10 ** d, 1)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#eee"/>'
                     f'<text x="{x:.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle">{10 ** d:,}</text>')
    for d in range(ydec + 1):
        _, y = px(1, 10 ** d)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{10 ** d:,}</text>')
    for name, colour in (("before", "#777"), ("after", "#2166ac")):
        sizes = curves[name]
        if len(sizes):
            ranks = np.unique(np.round(np.logspace(0, math.log10(len(sizes)), 400)).astype(np.int64))
            points = " ".join("%.1f,%.1f" % px(r, sizes[r - 1]) for r in ranks)
            parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2">'
                         f"<title>{name}</title></polyline>")
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" font-size="12" text-anchor="middle">cluster rank '
                 f'(largest first)</text><text x="12" y="{top + ph / 2}" font-size="12" text-anchor="middle" '
                 f'transform="rotate(-90 12 {top + ph / 2})">samples</text>')
    return f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}">{"".join(parts)}</svg>'


def sizes_section(counts: Counts) -> str:
    def stats(a: np.ndarray) -> list[str]:
        a = a[a > 0]
        if not len(a):
            return ["0", "-", "-", "-", "-"]
        return [_n(len(a)), _n(a.max()), _n(np.median(a)), _n(a.min()), f"{a.max() / a.min():,.1f}"]

    names = ["non-empty clusters", "largest", "median", "smallest", "largest / smallest"]
    rows = "".join(f"<tr><td>{n}</td><td>{b}</td><td>{a}</td></tr>"
                   for n, b, a in zip(names, stats(counts.total), stats(counts.kept)))
    emptied = int(((counts.total > 0) & (counts.kept == 0)).sum())
    return ("<h2>Cluster sizes, finest level</h2>"
            '<p class="meta">Sorted sizes, log-log: <b style="color:#777">before</b> and '
            '<b style="color:#2166ac">after</b> selection' + (f"; {_n(emptied)} clusters emptied" if emptied else "")
            + f"</p>{sizes_svg(counts.total, counts.kept)}<table><tr><th></th><th>before</th><th>after</th></tr>"
            f"{rows}</table>")


def _plural(n: int, word: str) -> str:
    return f"{_n(n)} {word}" + ("" if n == 1 else "s")


def cluster_block(cluster: int, counts: Counts, rows: list[dict], thumbs) -> str:
    """One cluster: its parents, its counts, and its sampled rows as a grid (kept first)."""
    total, kept, dup, balanced = (int(a[cluster]) for a in (counts.total, counts.kept, counts.duplicate,
                                                             counts.balanced))
    levels = sorted((k for k in (rows[0] if rows else {}) if k.startswith("cluster_") and k != "cluster_0"),
                    key=lambda k: int(k[8:]))
    parents = "".join(f" · level {k[8:]}: {rows[0][k]}" for k in levels)
    other = total - kept - dup - balanced
    facts = (f"{_plural(total, 'sample')} → {_n(kept)} kept ({_pct(kept, total)}) · {_plural(dup, 'duplicate')} · "
             f"{_n(balanced)} balanced out" + (f" · {_n(other)} dropped otherwise" if other else "")
             + f" · {len(rows)} shown")
    tiles = "".join(tile(r, thumbs) for r in rows)
    return (f'<section><h3 id="c{cluster}">Cluster {cluster}<span class="meta">{escape(parents)}</span></h3>'
            f'<div class="meta">{facts}</div><div class="grid" id="grid-c{cluster}">{tiles}</div></section>')


def dup_block(number: int, group: tuple, thumbs) -> str:
    key, size, head, rows = group
    head_rows = head.to_pylist() if head is not None else []
    tiles = "".join(tile(r, thumbs) for r in head_rows + rows.to_pylist())
    note = "" if head_rows else ' <span class="warn">(its kept row is not in the selection)</span>'
    return (f'<h3>{escape(key)}{note}</h3><div class="meta">kept, and {_plural(size, "sample")} dropped as its '
            f'duplicates · {rows.num_rows} of them shown</div><div class="grid" id="grid-d{number}">{tiles}</div>')


def render(info: dict, dest: str, counts: Counts, samples: Samples, chosen: tuple[list[int], list[int]],
           thumbs: dict[tuple[str, int], Thumb], seed: int) -> str:
    largest, small = chosen

    def clusters(ids: list[int]) -> str:  # as cards side by side: small ones share a row
        return '<div class="cards">' + "".join(cluster_block(c, counts, samples.clusters[c].to_pylist(), thumbs)
                                               for c in ids if c in samples.clusters) + "</div>"

    body = [header(info, dest), counts_section(info, counts), sizes_section(counts),
            f"<h2>The {len(largest)} largest clusters</h2>", legend(), clusters(largest),
            f"<h2>{len(small)} small clusters</h2><p class='meta'>drawn at random (seed {seed}) among the clusters "
            "no larger than the median</p>", clusters(small), "<h2>The largest duplicate groups</h2>",
            "".join(dup_block(i, g, thumbs) for i, g in enumerate(samples.dup_groups)) or '<p class="meta">none</p>']
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Curation report</title>'
            f'<meta name="viewport" content="width=device-width"><style>{CSS}</style></head><body>'
            + "\n".join(body) + "</body></html>\n")
