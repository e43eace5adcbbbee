"""One pass over a stream of inputs: download (http), decode (workers), back in input order, dedup, then
into the shard sequence or the rejects; with a progress bar (URLs/s, success rate) and metrics."""
from __future__ import annotations

import resource
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from tqdm import tqdm

from .dedup import Deduper
from .discover import InputFile
from .download import Downloader, HttpOptions
from .feed import Feed
from .keys import json_safe
from .metrics import IngestMetrics
from .record import Record
from .rejects import record as reject_record
from .sequence import ShardSequence
from .validate import DUPLICATE, Reject
from .workers import DecodePool


@dataclass
class PassStats:
    bytes_in: int = 0
    replaced_workers: int = 0
    http_status: Counter = field(default_factory=Counter)  # final status per URL ("none": no answer)
    worker_cpu: float = 0.0
    end: int = 0                     # the position after the last input processed


def _children_cpu() -> float:
    # Workers forked by this process count here once joined (forkserver-started ones do not).
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _postfix(written: int, reasons: Counter) -> str:
    done = written + sum(reasons.values())
    rate = f"ok {100 * written / done:.1f}%" if done else "ok -"
    return rate + (", rejected " + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) if reasons else "")


@dataclass
class Ingest:
    pool: DecodePool
    http: HttpOptions | None         # None: no http(s) inputs, no download stage
    metrics: IngestMetrics | None = None
    metrics_port: int | None = None
    progress: bool = True
    desc: str = "shards"

    def run(self, items: Iterable[InputFile], start: int, total: int | None, seq: ShardSequence,
            deduper: Deduper, rejected: list) -> PassStats:
        """Process `items` (positions from `start`) into `seq` / `rejected`; `total` for the bar."""
        stats, cpu0 = PassStats(end=start), _children_cpu()
        self.pool.start()  # before any thread: workers are forked
        if self.metrics is not None and self.metrics_port is not None:
            self.metrics.serve(self.metrics_port)
        downloader = Downloader(self.http, self.metrics) if self.http else None
        feed = Feed(items, start, downloader)
        bar = tqdm(total=total, initial=start, unit="url" if downloader else "img", desc=self.desc,
                   disable=not self.progress, dynamic_ncols=True, mininterval=0.5)
        results = self.pool.imap(feed.tasks(), feed.fileno())
        reasons, written = Counter(), 0
        try:
            for pos, item, result, nbytes in feed.ordered(results):
                stats.bytes_in += nbytes
                stats.end = pos + 1
                if isinstance(result, Record) and (kept := deduper.check(result.digest)) is not None:
                    result = Reject(DUPLICATE, f"duplicate of {kept}")
                if isinstance(result, Reject):
                    self._reject(feed, pos, item, result, nbytes, seq, rejected)
                    reasons[result.reason] += 1
                else:
                    deduper.add(result.digest, item.key)
                    seq.add(pos, item, json_safe(item.path), json_safe(item.label), result, nbytes)
                    written += 1
                if self.metrics:
                    self.metrics.done(result.reason if isinstance(result, Reject) else "written")
                bar.set_postfix_str(_postfix(written, reasons) + (f"; {downloader.summary}" if downloader else ""),
                                    refresh=False)
                bar.update()
        finally:
            results.close()
            self.pool.close()
            bar.close()
            if downloader:
                downloader.close()
        stats.http_status = feed.statuses
        stats.replaced_workers = self.pool.replaced
        stats.worker_cpu = _children_cpu() - cpu0
        return stats

    @staticmethod
    def _reject(feed: Feed, pos: int, item: InputFile, result: Reject, nbytes: int, seq: ShardSequence,
                rejected: list) -> None:
        info = {"key": item.key}
        outcome = feed.outcomes.pop(pos, None)
        if outcome is not None:
            info.update(status=outcome.status, attempts=outcome.attempts)
        record = reject_record(json_safe(item.path), result.reason, result.detail, info)
        rejected.append(record)
        seq.reject(record, nbytes)
