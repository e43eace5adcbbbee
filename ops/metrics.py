"""Prometheus metrics of a training rank, served by prometheus-client.

Names follow Prometheus conventions: `mocostream_` prefix, base units, counters end in `_total`, a
`rank` label and no per-sample or per-shard labels.
"""
from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, Counter as PCounter, Gauge, Histogram, start_http_server

from mocostream.pipeline.skip_log import SKIP_REASONS  # exported at 0 from the start: rates and alerts have a series

from .cpu_metrics import CpuCollector


STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class MetricsError(OSError):
    user_error = True


class Endpoint:
    """A registry served over HTTP by prometheus-client while a job runs."""

    registry: CollectorRegistry
    server = None

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Start the HTTP endpoint; returns the bound port (useful when port 0 asks for any)."""
        try:
            self.server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:  # in use, or an address this host does not have
            raise MetricsError(f"cannot serve metrics on {addr}:{port}: {e.strerror or e} (choose another "
                               "--metrics-port, or 0 to turn the endpoint off)") from None
        return self.server.server_port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class TrainMetrics(Endpoint):
    def __init__(self, rank: int):
        self.rank = str(rank)
        self.registry = r = CollectorRegistry()
        label = ["rank"]
        self.samples = PCounter("mocostream_samples", "Samples trained on.", label, registry=r)
        self.skipped = PCounter("mocostream_samples_skipped", "Samples skipped, by reason.",
                                ["rank", "reason"], registry=r)
        self.step_seconds = Histogram("mocostream_step_duration_seconds", "Wall time of one training step, data wait included.",
                                      label, buckets=STEP_BUCKETS, registry=r)
        self.data_wait = Histogram("mocostream_data_wait_seconds", "Time a step waited for its batch.",
                                   label, buckets=STEP_BUCKETS, registry=r)
        self.loss = Gauge("mocostream_loss", "InfoNCE loss of the latest logged step.", label, registry=r)
        self.lr = Gauge("mocostream_learning_rate", "Current learning rate.", label, registry=r)
        self.accuracy = Gauge("mocostream_instance_accuracy",
                              "Fraction of queries whose positive key has the top logit.", label, registry=r)
        self.images_per_second = Gauge("mocostream_images_per_second",
                                       "Training throughput of this rank over the last log interval.", label, registry=r)
        self.step = Gauge("mocostream_step", "Optimizer steps done.", label, registry=r)
        self.nonfinite_steps = PCounter("mocostream_nonfinite_steps", "Steps skipped for a non-finite loss or gradient.",
                                        label, registry=r)
        self.nonfinite_steps.labels(self.rank)
        self.grad_norm = Gauge("mocostream_grad_norm", "Global L2 norm of the query encoder's gradient (before any "
                               "--clip-grad), latest logged step.",
                               label, registry=r)
        self.moco_momentum = Gauge("mocostream_moco_momentum", "Momentum m of the key encoder update.", label, registry=r)
        self.knn_top1 = Gauge("mocostream_knn_top1", "Weighted kNN top-1 accuracy on the labelled eval set "
                              "(latest evaluation).", label, registry=r)
        self.knn_seconds = Histogram("mocostream_knn_duration_seconds", "Time of one kNN evaluation.", label,
                                     buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800), registry=r)
        self.epoch = Gauge("mocostream_epoch", "Epoch of the data stream.", label, registry=r)
        self.epoch_progress = Gauge("mocostream_epoch_progress_ratio", "Fraction of the current epoch consumed.",
                                    label, registry=r)
        self.storage_bytes = PCounter("mocostream_storage_read_bytes", "Shard bytes read from storage.",
                                      label, registry=r)
        self.storage_seconds = Histogram("mocostream_storage_read_seconds", "Time to read one whole shard.",
                                         label, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                                         registry=r)
        self.storage_retries = PCounter("mocostream_storage_retries", "Shard reads retried after an error.",
                                        label, registry=r)
        self.shards_failed = PCounter("mocostream_shards_failed", "Shards given up on after the last retry.",
                                      label, registry=r)
        for family in (self.storage_bytes, self.storage_retries, self.shards_failed):
            family.labels(self.rank)
        self.checkpoint_seconds = Histogram("mocostream_checkpoint_duration_seconds", "Time to write a checkpoint.",
                                            label, registry=r)
        # CPU budget and thread split (set at start-up; intra_op follows the thread tuner), and CPU
        # throttling / run delay read at each scrape
        self.cpu_budget = Gauge("mocostream_cpu_budget_cpus", "CPUs this rank's thread pools are sized from.",
                                label, registry=r)
        self.threads = Gauge("mocostream_threads", "Threads of each pool: intra_op (torch compute), interop, "
                             "loader (DALI threads or augmentation processes).", ["rank", "pool"], registry=r)
        r.register(CpuCollector(self.rank))
        for reason in SKIP_REASONS:
            self.skipped.labels(self.rank, reason)
        self._skipped_seen: Counter = Counter()
        self.server = None

    def record_step(self, samples: int, step_seconds: float, wait_seconds: float) -> None:
        self.samples.labels(self.rank).inc(samples)
        self.step_seconds.labels(self.rank).observe(step_seconds)
        self.data_wait.labels(self.rank).observe(wait_seconds)

    def record_log(self, *, step: int, loss: float, lr: float, accuracy: float, images_per_second: float,
                   epoch: int, epoch_progress: float, grad_norm: float, momentum: float, nonfinite: int) -> None:
        r = self.rank
        self.grad_norm.labels(r).set(grad_norm)
        self.moco_momentum.labels(r).set(momentum)
        self.nonfinite_steps.labels(r).inc(nonfinite)
        self.step.labels(r).set(step)
        self.loss.labels(r).set(loss)
        self.lr.labels(r).set(lr)
        self.accuracy.labels(r).set(accuracy)
        self.images_per_second.labels(r).set(images_per_second)
        self.epoch.labels(r).set(epoch)
        self.epoch_progress.labels(r).set(epoch_progress)

    def record_cpu(self, cpus: int, pools: dict) -> None:
        self.cpu_budget.labels(self.rank).set(cpus)
        for pool, n in pools.items():
            self.threads.labels(self.rank, pool).set(n)

    def record_knn(self, top1: float, seconds: float) -> None:
        self.knn_top1.labels(self.rank).set(top1)
        self.knn_seconds.labels(self.rank).observe(seconds)

    # pipeline.storage.StorageObserver: called from the shard reader threads (prometheus-client is thread-safe)
    def read(self, nbytes: int, seconds: float) -> None:
        self.storage_bytes.labels(self.rank).inc(nbytes)
        self.storage_seconds.labels(self.rank).observe(seconds)

    def retry(self) -> None:
        self.storage_retries.labels(self.rank).inc()

    def failed(self) -> None:
        self.shards_failed.labels(self.rank).inc()

    def sync_skipped(self, skipped: Counter) -> None:
        """Bring the skip counters up to the loader's running totals."""
        for reason, total in list(skipped.items()):
            delta = total - self._skipped_seen[reason]
            if delta > 0:
                self.skipped.labels(self.rank, reason).inc(delta)
                self._skipped_seen[reason] = total


class EmbedMetrics(Endpoint):
    """Metrics of a `curate embed` rank (curate.embed.EmbedObserver, and the shard reader's StorageObserver):
    images embedded and their rate, shards done of this rank's share, samples skipped by reason, storage."""

    def __init__(self, rank: int, window_seconds: float = 10.0):
        self.rank, self.window = str(rank), window_seconds
        self.registry = r = CollectorRegistry()
        label = ["rank"]
        self.images = PCounter("mocostream_curate_images", "Images embedded.", label, registry=r)
        self.rate = Gauge("mocostream_curate_images_per_second", "Images embedded per second over the last "
                          "few seconds.", label, registry=r)
        self.shards = Gauge("mocostream_curate_shards", "Shards of this rank's share of the data.", label, registry=r)
        self.shards_done = Gauge("mocostream_curate_shards_done", "Shards of this rank's share embedded so far "
                                 "(earlier runs included).", label, registry=r)
        self.progress = Gauge("mocostream_curate_progress_ratio", "Fraction of this rank's shards embedded.",
                              label, registry=r)
        self.skipped_samples = PCounter("mocostream_curate_samples_skipped", "Samples not embedded, by reason.",
                                        ["rank", "reason"], registry=r)
        self.storage_bytes = PCounter("mocostream_storage_read_bytes", "Shard bytes read from storage.", label,
                                      registry=r)
        self.storage_retries = PCounter("mocostream_storage_retries", "Shard reads retried after an error.", label,
                                        registry=r)
        self.shards_failed = PCounter("mocostream_shards_failed", "Shards given up on after the last retry.", label,
                                      registry=r)
        for family in (self.images, self.storage_bytes, self.storage_retries, self.shards_failed):
            family.labels(self.rank)
        for reason in SKIP_REASONS:
            self.skipped_samples.labels(self.rank, reason)
        self._recent: list[tuple[float, int]] = []
        self._shards, self._done = 0, 0

    def started(self, shards: int, done: int) -> None:
        self._shards, self._done = shards, done
        self.shards.labels(self.rank).set(shards)
        self._set_done()

    def _set_done(self) -> None:
        self.shards_done.labels(self.rank).set(self._done)
        self.progress.labels(self.rank).set(self._done / self._shards if self._shards else 1.0)

    def embedded(self, images: int) -> None:
        import time

        now = time.monotonic()
        self.images.labels(self.rank).inc(images)
        self._recent = [(t, n) for t, n in self._recent if now - t <= self.window] + [(now, images)]
        span = now - self._recent[0][0]
        if span > 0:
            self.rate.labels(self.rank).set(sum(n for _, n in self._recent[1:]) / span)

    def skipped(self, reason: str, n: int) -> None:
        self.skipped_samples.labels(self.rank, reason).inc(n)

    def shard_done(self) -> None:
        self._done += 1
        self._set_done()

    def read(self, nbytes: int, seconds: float) -> None:
        self.storage_bytes.labels(self.rank).inc(nbytes)

    def retry(self) -> None:
        self.storage_retries.labels(self.rank).inc()

    def failed(self) -> None:
        self.shards_failed.labels(self.rank).inc()
