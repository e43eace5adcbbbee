"""What a hostile user or a bad night does to a training job, through the real CLI: fresh runs into used
checkpoint folders, Ctrl-C and kill -9 of the process group, damaged checkpoints, unwritable folders."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from test_train import cli

SMALL = ["--arch", "resnet18_cifar_small", "--image-size", "16", "--batch-size", "4", "--queue-size", "64",
         "--workers", "1", "--log-every", "1", "--no-progress", "--metrics-port", "0", "--recipe", "moco_v1"]


@pytest.fixture(scope="module")
def shards(imagenette_small, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("reliability") / "tar"
    r = cli("shards", "create", str(imagenette_small), "--out", str(out), "--samples-per-shard", "16", "--quiet")
    assert r.returncode == 0, r.stderr
    return str(out)


def train(shards: str, ckpt: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return cli("train", "--data", shards, "--backend", "torch", "--checkpoint-dir", str(ckpt), *SMALL, *extra,
               env=env)


def summary_of(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def one_line_error(r: subprocess.CompletedProcess) -> str:
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert err and err[-1].startswith("mocostream: error:"), err
    return err[-1]


def steps_in(ckpt: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in ckpt.glob("checkpoint-*.pt"))


# ---- a fresh run into a used checkpoint folder ---------------------------------------------------------
def test_fresh_run_into_a_used_checkpoint_folder_is_refused_and_resume_continues(shards, tmp_path):
    ckpt = tmp_path / "ckpt"
    summary_of(train(shards, ckpt, "--steps", "6", "--checkpoint-every", "2"))
    assert steps_in(ckpt) == [4, 6]
    # The fresh 3-step run would have had its own checkpoints pruned by the longer run's: refused at start.
    error = one_line_error(train(shards, ckpt, "--steps", "3"))
    assert "already holds checkpoints" in error and "--resume" in error and "step 6" in error
    assert steps_in(ckpt) == [4, 6]
    resumed = summary_of(train(shards, ckpt, "--steps", "8", "--resume"))
    assert resumed["steps_run"] == 2 and Path(resumed["checkpoint"]).exists() and steps_in(ckpt) == [6, 8]


def test_retention_never_removes_the_checkpoint_just_written(tmp_path):
    from ops import checkpoint

    for step in (30, 40):
        checkpoint.save(str(tmp_path), step, {"step": step}, keep=2)
    path = checkpoint.save(str(tmp_path), 5, {"step": 5}, keep=2)
    assert Path(path).exists() and steps_in(tmp_path) == [5, 30, 40]
    checkpoint.save(str(tmp_path), 50, {"step": 50}, keep=2)
    assert steps_in(tmp_path) == [40, 50]


# ---- signals to the whole process group ---------------------------------------------------------------
def start(shards: str, ckpt: Path, trace: Path, *extra: str) -> subprocess.Popen:
    """A long torch-backend run in its own process group (as a terminal's foreground job is)."""
    cmd = [sys.executable, "-m", "ops.cli", "train", "--data", shards, "--backend", "torch",
           "--checkpoint-dir", str(ckpt), "--trace-keys", str(trace), "--steps", "100000",
           "--checkpoint-every", "100000", *SMALL, "--workers", "2", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def wait_for_steps(proc: subprocess.Popen, trace: Path, steps: int) -> None:
    """Until the trace holds `steps` steps of keys (an event, not a clock); the job must still run."""
    rank0 = Path(f"{trace}.rank0")
    while not rank0.exists() or len(rank0.read_text().split()) < 4 * steps:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.returncode}\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.1)


def descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.parametrize("attempt", range(2))
def test_ctrl_c_to_the_process_group_checkpoints_and_exits_0(shards, tmp_path, attempt):
    ckpt, trace = tmp_path / "ckpt", tmp_path / "keys"
    proc = start(shards, ckpt, trace)
    try:
        wait_for_steps(proc, trace, 2)
        workers = descendants(proc.pid)
        assert len(workers) >= 2  # the augmentation workers (+ forkserver, resource tracker) get it too
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped"] and summary["step"] >= 2
    assert steps_in(ckpt) == [summary["step"]]
    assert len(Path(f"{trace}.rank0").read_text().split()) == 4 * summary["step"]
    assert not [p for p in workers if alive(p)]


def test_kill_9_of_the_trainer_leaves_no_worker_behind(shards, tmp_path):
    proc = start(shards, tmp_path / "ckpt", tmp_path / "keys")
    try:
        wait_for_steps(proc, tmp_path / "keys", 1)
        left = descendants(proc.pid)
        assert len(left) >= 3  # 2 workers, the forkserver, the resource tracker
        proc.kill()  # SIGKILL to the trainer alone: no clean-up code runs in it
        proc.wait(timeout=60)
        deadline = time.monotonic() + 120  # a failure bound only: they go as soon as the trainer is gone
        while [p for p in left if alive(p)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in left if alive(p)], [Path(f"/proc/{p}/cmdline").read_bytes() for p in left if alive(p)]
    finally:
        for p in descendants(proc.pid) | {proc.pid}:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.communicate()


# ---- damaged checkpoints ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_folder(shards, tmp_path_factory) -> Path:
    """Checkpoints at steps 4 and 6 of a 6-step run."""
    ckpt = tmp_path_factory.mktemp("trained") / "ckpt"
    summary_of(train(shards, ckpt, "--steps", "6", "--checkpoint-every", "2"))
    assert steps_in(ckpt) == [4, 6]
    return ckpt


DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "garbage": lambda data: os.urandom(4096),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_falls_back_from_a_damaged_latest_checkpoint(shards, trained_folder, tmp_path, damage):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_folder, ckpt)
    latest = ckpt / "checkpoint-00000006.pt"
    latest.write_bytes(DAMAGE[damage](latest.read_bytes()))
    r = train(shards, ckpt, "--steps", "7", "--resume")
    summary = summary_of(r)
    assert "checkpoint-00000006.pt is damaged" in r.stderr and "ERROR" in r.stderr  # loudly
    assert "resumed from" in r.stderr and "checkpoint-00000004.pt at step 4" in r.stderr
    assert summary["steps_run"] == 3 and summary["step"] == 7


def test_resume_with_only_damaged_checkpoints_is_a_one_line_error(shards, trained_folder, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_folder, ckpt)
    for path in ckpt.glob("checkpoint-*.pt"):
        path.write_bytes(b"")
    error = one_line_error(train(shards, ckpt, "--steps", "7", "--resume"))
    assert "no intact checkpoint" in error and "2 damaged" in error


def test_resume_with_another_architecture_is_a_one_line_error(shards, trained_folder, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_folder, ckpt)
    args = [a if a != "resnet18_cifar_small" else "resnet18_cifar_half" for a in SMALL]
    r = cli("train", "--data", shards, "--backend", "torch", "--checkpoint-dir", str(ckpt), *args,
            "--steps", "7", "--resume")
    assert "trained with --arch resnet18_cifar_small" in one_line_error(r)
    r = train(shards, ckpt, "--steps", "7", "--resume", "--dim", "32")
    assert "does not fit this model" in one_line_error(r)


# ---- the checkpoint folder is checked at start ----------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, read_only) -> a fresh real tmpfs (needs root or CAP_SYS_ADMIN; skips otherwise)."""
    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        path = tmp_path / f"mnt{len(mounted)}"
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if read_only else ""), "tmpfs",
                            str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_checkpoint_folder_fails_at_start(shards, tmpfs):
    ckpt = tmpfs("1m", read_only=True)
    r = train(shards, ckpt, "--steps", "3")
    error = one_line_error(r)
    assert "is not writable" in error and "Read-only file system" in error
    assert "step 1" not in r.stderr  # found before any work, not at the first checkpoint


def test_full_checkpoint_disk_fails_at_start(shards, tmpfs):
    ckpt = tmpfs("4m")
    r = train(shards, ckpt, "--steps", "3")
    error = one_line_error(r)
    assert "MB free; a checkpoint needs about" in error and "step 1" not in r.stderr


def test_a_checkpoint_that_fills_the_disk_leaves_no_partial_file(tmpfs):
    from ops import checkpoint

    ckpt = tmpfs("4m")
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device"):
        checkpoint.save(str(ckpt), 1, {"step": 1, "weights": torch.zeros(2 << 20)})  # 8 MB
    assert list(ckpt.iterdir()) == []


def test_bad_s3_credentials_for_checkpoints_fail_at_start(shards, s3_server):
    s3_server.make_bucket("ckpt-creds")
    env = {**s3_server.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    r = cli("train", "--data", shards, "--backend", "torch", "--checkpoint-dir", "s3://ckpt-creds/run", *SMALL,
            "--steps", "3", env=env)
    error = one_line_error(r)
    assert "is not writable" in error and "signature" in error.lower() and "step 1" not in r.stderr


# ---- storage that never answers --------------------------------------------------------------------------
@pytest.fixture
def silent_endpoint():
    """An HTTP endpoint that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    server.close()
    for conn in held:
        conn.close()


SILENT_ENV = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}


def test_training_start_up_honours_storage_timeout_and_retries(silent_endpoint, tmp_path):
    r = cli("train", "--data", "s3://bucket/data", "--storage-timeout", "1", "--storage-retries", "1",
            "--checkpoint-dir", str(tmp_path), "--metrics-port", "0",
            env={**SILENT_ENV, "AWS_ENDPOINT_URL": silent_endpoint}, timeout=180)
    error = one_line_error(r)
    assert "cannot read s3://bucket/data" in error and "after 1 retries, --storage-timeout 1 s" in error
    assert r.stderr.count("retry 1/1") == 1


def test_shards_create_to_a_silent_endpoint_fails_instead_of_hanging(silent_endpoint, imagenette_small):
    r = cli("shards", "create", str(imagenette_small), "--out", "s3://bucket/x", "--quiet",
            env={**SILENT_ENV, "AWS_ENDPOINT_URL": silent_endpoint, "MOCOSTREAM_STORAGE_TIMEOUT": "1"}, timeout=180)
    assert "Read timeout" in one_line_error(r)


def test_shards_create_with_a_wrong_secret_says_so(s3_server, imagenette_small):
    s3_server.make_bucket("create-creds")
    r = cli("shards", "create", str(imagenette_small), "--out", "s3://create-creds/x", "--quiet",
            env={**s3_server.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    error = one_line_error(r)
    assert "S3 refused access" in error and "AWS_SECRET_ACCESS_KEY" in error and "not found" not in error
