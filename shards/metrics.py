"""Prometheus metrics of `shards create` (served with --metrics-port): inputs by result, HTTP responses
by status code, bytes downloaded, download latency, requests in flight. `rank` is the --part index.
Labels are bounded sets (results are the reject reasons plus `written`; codes are HTTP's): no per-URL labels.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class IngestMetrics:
    def __init__(self, rank: int, results=()):
        self.rank = str(rank)
        self.registry = r = CollectorRegistry()
        self._inputs = Counter("mocostream_ingest_inputs", "Inputs done, by result (written or the reject reason).",
                               ["rank", "result"], registry=r)
        for result in ("written",) + tuple(results):  # exported at 0 so rates and alerts have a series
            self._inputs.labels(self.rank, result)
        self._responses = Counter("mocostream_ingest_http_responses", "HTTP responses received, by status code "
                                  "(every try).", ["rank", "code"], registry=r)
        self._bytes = Counter("mocostream_ingest_download_bytes", "Body bytes of successful downloads.", ["rank"],
                              registry=r).labels(self.rank)
        self._seconds = Histogram("mocostream_ingest_download_seconds", "Time to download one URL, retries "
                                  "and their waits included.", ["rank"], buckets=LATENCY_BUCKETS, registry=r
                                  ).labels(self.rank)
        self.in_flight = Gauge("mocostream_ingest_requests_in_flight", "URLs being downloaded (or waiting "
                               "to retry).", ["rank"], registry=r).labels(self.rank)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)

    def response(self, status: int) -> None:
        self._responses.labels(self.rank, str(status)).inc()

    def downloaded(self, outcome, seconds: float) -> None:
        self._seconds.observe(seconds)
        if outcome.data is not None:
            self._bytes.inc(len(outcome.data))

    def done(self, result: str) -> None:
        self._inputs.labels(self.rank, result).inc()
