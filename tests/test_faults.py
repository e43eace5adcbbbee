"""Flaky object storage: a fault proxy in front of the real SeaweedFS server. Every sample of the epoch is
still delivered exactly once, the retries show in the metrics, and a shard that keeps failing is skipped,
counted and logged while the epoch goes on."""
from __future__ import annotations

import urllib.parse

import pytest

from faultproxy import FaultProxy, Faults
from mocostream.ops.metrics import TrainMetrics
from mocostream.pipeline.loader import LoaderConfig, TwoViewLoader
from mocostream.pipeline.storage import StorageConfig
from mocostream.shards.create import create_shards


@pytest.fixture(scope="module")
def s3_tar_shards(imagenette_small, s3_server):
    import os

    s3_server.make_bucket("faults")
    saved = {k: os.environ.get(k) for k in s3_server.env}
    os.environ.update(s3_server.env)
    try:
        create_shards([str(imagenette_small)], "s3://faults/tar", fmt="tar", samples_per_shard=10, progress=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return "s3://faults/tar"


def metric(metrics: TrainMetrics, name: str) -> float:
    return sum(s.value for fam in metrics.registry.collect() for s in fam.samples if s.name == name)


@pytest.mark.parametrize("backend", ["opencv", "dali"])
def test_every_sample_once_through_faulty_storage(s3_tar_shards, s3_server, monkeypatch, backend):
    upstream = urllib.parse.urlparse(s3_server.endpoint).port
    # Every 2nd read gets a fault, each kind in turn: every kind is injected, whatever the read order.
    faults = Faults(cycle=True, path_contains=".tar")
    proxy = FaultProxy(upstream, faults)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    metrics = TrainMetrics(0)
    try:
        loader = TwoViewLoader(LoaderConfig(data=s3_tar_shards, batch_size=4, image_size=32, backend=backend,
                                            workers=1, epochs=1, read_ahead=3,
                                            storage=StorageConfig(retries=8, backoff_seconds=0.01)),
                               observer=metrics)
        keys = [k for b in loader for k in b.keys]
    finally:
        proxy.stop()
    assert len(keys) == len(set(keys)) == 120  # 120 photos in 12 shards, batch 4: all, once
    assert set(faults.counts) == {"reset", "error_500", "slow_down_503", "truncate", "latency"}
    # Every kind of fault landed on shard reads; the ones that reach our retry loop are counted (some are
    # absorbed by the HTTP client's own reconnects).
    assert metric(metrics, "mocostream_storage_retries_total") > 0
    assert metric(metrics, "mocostream_shards_failed_total") == 0
    assert metric(metrics, "mocostream_storage_read_bytes_total") > 0


def test_a_shard_that_keeps_failing_is_skipped_and_counted(s3_tar_shards, s3_server, monkeypatch, caplog):
    upstream = urllib.parse.urlparse(s3_server.endpoint).port
    proxy = FaultProxy(upstream, Faults(error_500=1.0, path_contains="shard-000003.tar"))  # this one always fails
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    metrics = TrainMetrics(0)
    try:
        loader = TwoViewLoader(LoaderConfig(data=s3_tar_shards, batch_size=4, image_size=32, backend="opencv",
                                            workers=0, epochs=1,
                                            storage=StorageConfig(retries=2, backoff_seconds=0.01)),
                               observer=metrics)
        keys = [k for b in loader for k in b.keys]
    finally:
        proxy.stop()
    # The epoch went on without the bad shard's 10 samples (the last 2 cannot fill a batch of 4: counted too).
    assert len(keys) == len(set(keys)) == 110 - loader.skipped["partial_last_batch"] == 108
    assert loader.skipped["shard_unreadable"] == 10
    assert metric(metrics, "mocostream_shards_failed_total") == 1
    assert metric(metrics, "mocostream_storage_retries_total") == 2
    assert "shard-000003.tar" in caplog.text
