"""`report.html`: the page a person opens to see what curation did, written into the destination folder
beside `selection.parquet` and `report.json` (read from there, local or object storage, through a Storage).

It shows the counts per stage and reason, the finest clusters' size distribution before and after selection,
thumbnail grids (kept and dropped, with the reason on hover) for the largest clusters and a seeded random
sample of small ones, and the largest duplicate groups. The work is bounded whatever the dataset's size: the
selection is streamed twice in record batches (memory: the finest clusters' counts plus the rows shown, see
report_scan), and at most `per_cluster` images per cluster shown and `per_group` + 1 per duplicate group are
read, each shard once and only where they are (report_images).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from mocostream.pipeline.filesystems import Storage, is_remote

from .report_html import render
from .report_images import read_thumbnails
from .report_scan import choose_clusters, count_rows, open_selection, sample_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportOptions:
    largest_clusters: int = 8  # the largest finest clusters shown
    small_clusters: int = 8  # small clusters shown, drawn at random (seed) among those no larger than the median
    per_cluster: int = 24  # thumbnails per cluster shown, half kept and half dropped where both have enough
    dup_groups: int = 6  # the largest duplicate groups shown
    per_group: int = 12  # dropped duplicates shown per group, beside the kept sample
    thumb_px: int = 64  # a thumbnail's longer side
    seed: int = 0
    batch_rows: int = 65536  # selection.parquet rows per record batch
    read_threads: int = 8  # shards read at once for thumbnails


def _join(dest: str, name: str) -> str:
    return dest.rstrip("/") + "/" + name


def build_report(dest: str, storage: Storage, options: ReportOptions = ReportOptions()) -> str:
    """The report's HTML from `dest`'s selection.parquet and report.json, and the shards' images."""
    o = options
    info = json.loads(storage.read_bytes(_join(dest, "report.json")))
    levels = info.get("levels") if isinstance(info, dict) else None
    if not isinstance(levels, list) or not levels or not isinstance(levels[0], int) or levels[0] < 1:
        raise ValueError(f"{_join(dest, 'report.json')} has no 'levels' list of cluster counts (finest first)")
    clusters = levels[0]
    with storage.open(_join(dest, "selection.parquet")) as f:
        pf = open_selection(f)
        counts = count_rows(pf, clusters, batch_rows=o.batch_rows, capacity=max(1024, 64 * o.dup_groups))
        chosen = choose_clusters(counts.total, o.largest_clusters, o.small_clusters, o.seed)
        samples = sample_rows(pf, chosen[0] + chosen[1], counts.dup_candidates, per_cluster=o.per_cluster,
                              per_group=o.per_group, groups=o.dup_groups, seed=o.seed, batch_rows=o.batch_rows)
    shown = list(samples.clusters.values())
    shown += [t for _, _, head, rows in samples.dup_groups for t in (head, rows) if t is not None]
    wanted = {row for t in shown for row in zip(*(t.column(c).to_pylist() for c in ("shard", "member", "key")))}
    log.info("report: %d rows in %d clusters, %d thumbnails from %d shards", counts.rows, int((counts.total > 0).sum()),
             len(wanted), len({s for s, _, _ in wanted}))
    thumbs = read_thumbnails(sorted(wanted), storage, o.thumb_px, o.read_threads)
    return render(info, dest, counts, samples, chosen, thumbs, o.seed)


def write_report(dest: str, storage: Storage, options: ReportOptions = ReportOptions()) -> str:
    """Write `dest/report.html` (see build_report) and return its path or URL. Locally it appears complete
    or not at all (a temporary file renamed); on object storage in one PUT."""
    html = build_report(dest, storage, options).encode("utf-8")
    url = _join(dest, "report.html")
    if is_remote(url):
        storage.write_bytes(url, html)
        return url
    path = storage.filesystem(url)[1]
    tmp = os.path.join(os.path.dirname(path), ".report.html.tmp")
    with open(tmp, "wb") as f:
        f.write(html)
    os.replace(tmp, path)
    return path
