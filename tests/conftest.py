"""The fixtures: real image data from ../shared/data, shards made from it, and a real S3 server (SeaweedFS).
What tests share besides fixtures is in helpers.py."""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from helpers import DATA_ENV, S3Server, cli, extract_members, need_archive


def pytest_configure(config):
    if "MOCOSTREAM_SHARED_DATA" in os.environ:  # the old name: every trainer would refuse it as an option
        raise pytest.UsageError(f"MOCOSTREAM_SHARED_DATA is now {DATA_ENV} (MOCOSTREAM_* variables are "
                                "training options)")


@pytest.fixture(scope="session")
def imagenette_small(tmp_path_factory) -> Path:
    """Imagenette train/ with 12 images per class (120 real 224-px photos in class folders)."""
    archive = need_archive("imagenette-mini.tar.gz")
    return extract_members(archive, tmp_path_factory.mktemp("imagenette"), "train", limit_per_dir=12)


@pytest.fixture(scope="session")
def labelled_shards(imagenette_small, tmp_path_factory) -> Path:
    """imagenette_small as tar shards made by `mocostream shards create`: 5 shards of 25 labelled images
    (the label is the class folder). Read-only: a test that changes shards works on a copy."""
    out = tmp_path_factory.mktemp("labelled-shards") / "tar"
    r = cli("shards", "create", str(imagenette_small), "--out", str(out), "--format", "tar",
            "--samples-per-shard", "25", "--quiet")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def webphotos(tmp_path_factory) -> Path:
    """webphotos jpg/: 500 real web-size photos."""
    archive = need_archive("webphotos.tar.gz")
    return extract_members(archive, tmp_path_factory.mktemp("webphotos"), "jpg")


@pytest.fixture(scope="session")
def messy_images(tmp_path_factory) -> Path:
    """The messy corpus: every kind of broken and odd image file."""
    archive = need_archive("messy-images.tar.gz")
    dest = tmp_path_factory.mktemp("messy")
    with tarfile.open(archive) as tf:
        tf.extractall(dest, filter="data")
    return dest


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The standard AWS variables pointing at the test server, set for this test."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return s3_server
