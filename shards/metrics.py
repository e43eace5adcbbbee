"""Prometheus metrics of `shards create` (served with --metrics-port): inputs by result, HTTP responses
by status code, bytes downloaded, download latency, requests in flight, and per host: connections open and
the adaptive connection limit, back-offs by cause, Retry-After pauses. `rank` is the --part index.
Labels are bounded sets (results are the reject reasons plus `written`; codes are HTTP's; hosts are the
10 with the most requests, the connections to all others summed as host="other"): no per-URL labels.
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
        self.in_flight = Gauge("mocostream_ingest_requests_in_flight", "URLs being downloaded (or waiting for "
                               "their host, or to retry).", ["rank"], registry=r).labels(self.rank)

        self._host_conns = Gauge("mocostream_ingest_host_connections", "Connections open to a host now (the "
                                 "hosts with the most requests; host=\"other\": all the others together).",
                                 ["rank", "host"], registry=r)
        self._host_limit = Gauge("mocostream_ingest_host_connection_limit", "Connections a host may have at "
                                 "once now (adapted to its answers, between 1 and --per-host-connections).",
                                 ["rank", "host"], registry=r)
        self._backoffs = Counter("mocostream_ingest_host_backoffs", "Times a host's connection limit was "
                                 "halved, by cause (429, 503, timeout, connection).", ["rank", "cause"], registry=r)
        for cause in ("429", "503", "timeout", "connection"):
            self._backoffs.labels(self.rank, cause)
        self._pauses = Counter("mocostream_ingest_host_pauses", "Times a host was paused for its "
                               "Retry-After.", ["rank"], registry=r).labels(self.rank)
        self._named: set[str] = set()
        self._counted: dict = {}

    def hosts(self, top: list[tuple], other: int, backoffs: dict, pauses: int) -> None:
        """The download stage's host table: top [(host, open, limit, requests)], open to the rest, totals."""
        names = {host for host, *_ in top}
        for host in self._named - names:
            self._host_conns.remove(self.rank, host)
            self._host_limit.remove(self.rank, host)
        for host, active, limit, _ in top:
            self._host_conns.labels(self.rank, host).set(active)
            self._host_limit.labels(self.rank, host).set(int(limit))
        self._host_conns.labels(self.rank, "other").set(other)
        self._named = names
        for cause, n in {**backoffs, "pauses": pauses}.items():
            grown = n - self._counted.get(cause, 0)
            if grown > 0:
                (self._pauses if cause == "pauses" else self._backoffs.labels(self.rank, cause)).inc(grown)
            self._counted[cause] = n

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
