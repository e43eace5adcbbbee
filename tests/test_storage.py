"""Every reader and writer honours the same storage timeouts and retries: against an endpoint that accepts
connections and never answers, each one gives up after --storage-retries retries of --storage-timeout seconds
with a clear error, in a fresh process (no trainer ran before to set anything up). The endpoint counts the
connections: one per attempt. With the defaults (60 s, 5 retries) each case would take over 6 minutes; the
bound below is far from both that and the ~2.5 s of storage time the settings allow, so machine speed does
not decide the outcome."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse

import pytest
import torch

from helpers import REPO

TIMEOUT, RETRIES = 1, 1
FLAGS = ["--storage-timeout", str(TIMEOUT), "--storage-retries", str(RETRIES)]
GIVES_UP = f"(after {RETRIES} retries, --storage-timeout {TIMEOUT} s)"
BOUND_S = 150  # a wall-clock bound for a whole command, imports included
SMALL = ["--arch", "resnet18_cifar_small", "--image-size", "16", "--batch-size", "4", "--queue-size", "64",
         "--backend", "opencv", "--workers", "0", "--metrics-port", "0", "--no-progress", "--recipe", "moco_v1"]


class SilentEndpoint:
    """A loopback TCP server that accepts every connection and never sends a byte."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.server.accept()[0])
            except OSError:  # closed
                return

    @property
    def connections(self) -> int:
        return len(self.held)

    def close(self) -> None:
        self.server.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def silent():
    endpoint = SilentEndpoint()
    yield endpoint
    endpoint.close()


def storage_env(endpoint: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOCOSTREAM_"))}
    return {**env, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
            "AWS_DEFAULT_REGION": "us-east-1"}


def run(argv: list[str], env: dict) -> tuple[int, str]:
    """(exit status, stderr) of a fresh process, which must end within BOUND_S."""
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"still running after {BOUND_S} s: {err[-2000:]}")
    return proc.returncode, err


def cli(*args: str, endpoint: str) -> tuple[int, str]:
    return run([sys.executable, "-m", "mocostream.ops.cli", *args], storage_env(endpoint))


def one_line_error(code: int, err: str) -> str:
    assert code == 2 and "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("mocostream: error:"), err[-3000:]
    return line


@pytest.fixture
def external_manifest(tmp_path) -> str:
    """A local manifest whose one shard lies on the silent endpoint (read with --allow-external-shards)."""
    path = tmp_path / "data" / "manifest.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"shards": [{"name": "s3://bucket/shard-000000.tar", "samples": 4, "bytes": 8192}]}))
    return str(path)


@pytest.mark.slow
def test_trainer_stream_read_gives_up_after_the_retries(silent, external_manifest, tmp_path):
    code, err = cli("train", "--data", external_manifest, "--allow-external-shards", "--epochs", "1", *SMALL,
                    "--checkpoint-dir", str(tmp_path / "ckpt"), *FLAGS, endpoint=silent.url)
    assert "produced no readable sample" in one_line_error(code, err)
    assert "s3://bucket/shard-000000.tar: ReadTimeoutError" in err and f"(after {RETRIES} retries)" in err
    assert err.count(f"retry 1/{RETRIES}") == RETRIES and silent.connections == RETRIES + 1


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["opencv", "dali"])  # dali: the stream is read inside DALI's pipeline run
def test_sigterm_during_a_stalled_read_checkpoints_and_exits(silent, external_manifest, tmp_path, backend):
    """Preemption while the trainer waits for a shard whose read stalls (here for --storage-timeout 600 s): the
    wait is cut short, the stop checkpoint is written and the process ends with 0 long before the read would
    give up; exit, which would join the stalled reader thread, is ended by the exit deadline, with the
    threads' stacks logged."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    argv = [sys.executable, "-m", "mocostream.ops.cli", "train", "--data", external_manifest,
            "--allow-external-shards", *SMALL, "--backend", backend, "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--storage-timeout", "600", "--storage-retries", "0"]
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(argv, cwd=REPO, env=storage_env(silent.url), stdout=fo, stderr=fe)
    try:
        while silent.connections == 0:  # the stream's first read is in flight: the trainer waits for its batch
            assert proc.poll() is None, err.read_text()[-3000:]
            threading.Event().wait(0.1)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=BOUND_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = err.read_text()
    assert code == 0, log[-3000:]
    assert "stopped while waiting for data" in log and "checkpoint (stop) at step 0" in log, log[-3000:]
    assert (tmp_path / "ckpt" / "checkpoint-00000000.pt").exists()
    assert "exit still waiting" in log and "_load_shard" in log  # the deadline, and the stalled read's stack
    assert "ReadTimeoutError" not in log  # the read was never given up on


@pytest.mark.slow
def test_trainer_init_from_weights_gives_up_after_the_retries(silent, external_manifest, tmp_path):
    code, err = cli("train", "--data", external_manifest, "--allow-external-shards", *SMALL, "--init-from",
                    "s3://bucket/weights.pt", "--checkpoint-dir", str(tmp_path / "ckpt"), *FLAGS, endpoint=silent.url)
    error = one_line_error(code, err)
    assert "cannot read s3://bucket/weights.pt: ReadTimeoutError" in error and GIVES_UP in error
    assert err.count(f"retry 1/{RETRIES}") == RETRIES and silent.connections == RETRIES + 1


@pytest.mark.slow
def test_trainer_checkpoint_folder_gives_up_after_the_retries(silent, external_manifest):
    code, err = cli("train", "--data", external_manifest, "--allow-external-shards", *SMALL, "--checkpoint-dir",
                    "s3://bucket/run", *FLAGS, endpoint=silent.url)
    error = one_line_error(code, err)
    assert "checkpoint folder s3://bucket/run is not writable: cannot write s3://bucket/run/.write-probe" in error
    assert GIVES_UP in error and silent.connections == RETRIES + 1


@pytest.mark.slow
def test_eval_data_read_gives_up_after_the_retries(silent):
    code, err = cli("eval", "knn", "--data", "s3://bucket/labelled", "--arch", "resnet18_cifar_small", *FLAGS,
                    endpoint=silent.url)
    error = one_line_error(code, err)
    assert "cannot read s3://bucket/labelled: ReadTimeoutError" in error and GIVES_UP in error
    assert err.count(f"retry 1/{RETRIES}") == RETRIES and silent.connections == RETRIES + 1


@pytest.mark.slow
def test_export_write_gives_up_after_the_retries(silent, tmp_path):
    ckpt = tmp_path / "checkpoint-00000001.pt"  # the least a training checkpoint holds for export
    torch.save({"step": 1, "config": {"arch": "resnet18_cifar_small"},
                "model": {"encoder_q.conv1.weight": torch.zeros(4, 3, 3, 3)}}, ckpt)
    code, err = cli("export", str(ckpt), "--out", "s3://bucket/backbone.pt", "--format", "torchvision", *FLAGS,
                    endpoint=silent.url)
    error = one_line_error(code, err)
    assert "cannot write s3://bucket/backbone.pt: ReadTimeoutError" in error and GIVES_UP in error
    assert err.count(f"retry 1/{RETRIES}") == RETRIES and silent.connections == RETRIES + 1


STORAGE_CALL = """
import logging, sys
logging.basicConfig(level=logging.WARNING)
from mocostream.ops import checkpoint
from mocostream.pipeline.filesystems import Storage, StorageConfig
storage = Storage(StorageConfig(read_timeout={timeout}, retries={retries}))
try:
    {call}
except (checkpoint.CheckpointError, OSError) as e:
    print(f"{{type(e).__name__}}: {{e}}", file=sys.stderr)
    sys.exit(3)
"""


@pytest.mark.slow
@pytest.mark.parametrize("call,words", [
    ('checkpoint.save("s3://bucket/run", 1, {"step": 1}, storage=storage)',
     "CheckpointError: cannot write checkpoint s3://bucket/run/checkpoint-00000001.pt: ReadTimeoutError"),
    ('checkpoint.load_latest_intact("s3://bucket/run", storage=storage)',
     "StorageUnavailable: cannot list checkpoints in s3://bucket/run: ReadTimeoutError"),
    # a body far larger than the socket buffers: the upload itself stalls, before any answer is awaited
    pytest.param('storage.write_bytes("s3://bucket/big", bytes(64 << 20))', "StorageUnavailable: cannot write "
                 "s3://bucket/big", marks=pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"),
                                                             reason="stalled uploads are bounded on Linux")),
], ids=["checkpoint-save", "checkpoint-load", "large-upload"])
def test_checkpoints_and_uploads_give_up_after_the_retries(silent, call, words):
    code, err = run([sys.executable, "-c", STORAGE_CALL.format(timeout=TIMEOUT, retries=RETRIES, call=call)],
                    storage_env(silent.url))
    assert code == 3 and "Traceback" not in err, err[-3000:]
    assert words in err and GIVES_UP in err
    assert err.count(f"retry 1/{RETRIES}") == RETRIES
    # an aborted upload may reconnect once inside the HTTP client: at least one connection per attempt
    assert silent.connections == RETRIES + 1 if "big" not in call else silent.connections >= RETRIES + 1


@pytest.mark.slow
def test_shards_create_destination_gives_up_after_the_retries(silent, tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), "red").save(images / "red.png")
    code, err = cli("shards", "create", str(images), "--out", "s3://bucket/set", "--quiet", *FLAGS,
                    endpoint=silent.url)
    error = one_line_error(code, err)
    assert "cannot use destination s3://bucket/set: cannot list s3://bucket/set: ReadTimeoutError" in error
    assert GIVES_UP in error and silent.connections == RETRIES + 1


@pytest.mark.slow
def test_shards_create_remote_table_gives_up_after_the_retries(silent, tmp_path):
    """The shard tool's inputs too: a URL list on the silent endpoint is read with the run's settings."""
    code, err = cli("shards", "create", "s3://bucket/list.txt", "--out", str(tmp_path / "set"), "--quiet", *FLAGS,
                    endpoint=silent.url)
    error = one_line_error(code, err)
    assert "cannot read source s3://bucket/list.txt" in error and "ReadTimeoutError" in error and GIVES_UP in error
    assert err.count(f"retry 1/{RETRIES}") == RETRIES and silent.connections == RETRIES + 1


@pytest.mark.slow
def test_shards_create_remote_input_in_a_decode_worker_gives_up_after_the_retries(silent, tmp_path):
    """An s3:// entry of a local list is read by a decode worker, with the run's settings: it becomes one
    reject (download_failed) after the retries, not a hang and not the defaults' six minutes."""
    listing = tmp_path / "list.txt"
    listing.write_text("s3://bucket/a.jpg\n")
    out = tmp_path / "set"
    code, err = cli("shards", "create", str(listing), "--out", str(out), "--workers", "1", "--quiet", *FLAGS,
                    endpoint=silent.url)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == ["download_failed"], (code, err[-3000:])
    assert "ReadTimeoutError" in rejects[0]["detail"] and GIVES_UP in rejects[0]["detail"]
    assert silent.connections == RETRIES + 1


@pytest.mark.slow
def test_shards_create_shard_upload_gives_up_after_the_retries(s3_server, imagenette_small):
    """The shard writes themselves (not only the start-up listing): a proxy holds every PUT of a shard far
    longer than the timeout; the other requests pass through to the real S3 server. One shard of 120 images:
    one upload, so the proxy sees exactly its attempts."""
    from faultproxy import FaultProxy, Faults

    s3_server.make_bucket("silent-writes")
    faults = Faults(latency=1.0, latency_seconds=30, only_get=False, path_contains=".tar")
    proxy = FaultProxy(urllib.parse.urlparse(s3_server.endpoint).port, faults)
    try:
        env = {**storage_env(proxy.endpoint), **{k: v for k, v in s3_server.env.items() if k != "AWS_ENDPOINT_URL"}}
        code, err = run([sys.executable, "-m", "mocostream.ops.cli", "shards", "create", str(imagenette_small),
                         "--out", "s3://silent-writes/set", "--samples-per-shard", "1000", "--quiet", *FLAGS], env)
    finally:
        proxy.stop()
    error = one_line_error(code, err)
    assert "cannot write s3://silent-writes/set/shard-000000.tar: ReadTimeoutError" in error and GIVES_UP in error
    assert faults.counts == {"latency": RETRIES + 1}


def test_storage_pickles_as_its_settings_and_a_forked_child_makes_its_own_clients():
    """Decode workers get a Storage by pickling or forking: its settings travel, its clients do not."""
    import pickle

    from mocostream.pipeline.filesystems import Storage, StorageConfig

    storage = Storage(StorageConfig(read_timeout=3, retries=2, allow_external_shards=True), environ={"A": "b"})
    s3, path = storage.filesystem("s3://bucket/x")
    assert path == "bucket/x" and storage.filesystem("s3://bucket/y")[0] is s3  # one per protocol
    assert s3.retries == 1 and storage.allow_external_shards
    copy = pickle.loads(pickle.dumps(storage))
    assert (copy.config, copy.environ) == (storage.config, {"A": "b"})
    assert copy.filesystem("s3://bucket/x")[0] is not s3
    config = copy.options("s3://bucket/x")["config_kwargs"]
    assert (config["connect_timeout"], config["read_timeout"], config["retries"]) == (
        3, 3, {"total_max_attempts": 1, "mode": "standard"})
    storage._pid = -1  # as seen from a forked child: the parent's clients belong to the parent's event loop
    assert storage.filesystem("s3://bucket/x")[0] is not s3
