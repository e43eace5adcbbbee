"""What a hostile user or a bad night does to a training job, through the real CLI: fresh runs into used
checkpoint folders, Ctrl-C and kill -9 of the process group, damaged checkpoints, unwritable folders."""
from __future__ import annotations

import io
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

from helpers import REPO, cli, wait_for_trace

# --workers 0: no augmentation process to start (it imports torch again: most of a short run's time); the
# signal tests, which are about the workers, ask for 2.
SMALL = ["--arch", "resnet18_cifar_small", "--image-size", "16", "--batch-size", "4", "--queue-size", "64",
         "--workers", "0", "--log-every", "1", "--no-progress", "--metrics-port", "0", "--recipe", "moco_v1"]


@pytest.fixture(scope="module")
def shards(imagenette_small, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("reliability") / "tar"
    r = cli("shards", "create", str(imagenette_small), "--out", str(out), "--samples-per-shard", "16", "--quiet")
    assert r.returncode == 0, r.stderr
    return str(out)


def train(shards: str, ckpt: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return cli("train", "--data", shards, "--backend", "opencv", "--checkpoint-dir", str(ckpt), *SMALL, *extra,
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
@pytest.mark.slow
def test_fresh_run_into_a_used_checkpoint_folder_is_refused_and_resume_continues(shards, trained_folder, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_folder, ckpt)  # what a 6-step run with --checkpoint-every 2 left
    assert steps_in(ckpt) == [4, 6]
    # The fresh 3-step run would have had its own checkpoints pruned by the longer run's: refused at start.
    error = one_line_error(train(shards, ckpt, "--steps", "3"))
    assert "already holds checkpoints" in error and "--resume" in error and "step 6" in error
    assert steps_in(ckpt) == [4, 6]
    resumed = summary_of(train(shards, ckpt, "--steps", "8", "--resume"))
    assert resumed["steps_run"] == 2 and Path(resumed["checkpoint"]).exists() and steps_in(ckpt) == [6, 8]


def test_retention_never_removes_the_checkpoint_just_written(tmp_path):
    from mocostream.ops import checkpoint
    from mocostream.pipeline.filesystems import Storage

    for step in (30, 40):
        checkpoint.save(str(tmp_path), step, {"step": step}, keep=2, storage=Storage())
    path = checkpoint.save(str(tmp_path), 5, {"step": 5}, keep=2, storage=Storage())
    assert Path(path).exists() and steps_in(tmp_path) == [5, 30, 40]
    checkpoint.save(str(tmp_path), 50, {"step": 50}, keep=2, storage=Storage())
    assert steps_in(tmp_path) == [40, 50]


# ---- signals to the whole process group ---------------------------------------------------------------
def start(shards: str, ckpt: Path, trace: Path, *extra: str) -> subprocess.Popen:
    """A long opencv-backend run in its own process group (as a terminal's foreground job is)."""
    cmd = [sys.executable, "-m", "mocostream.ops.cli", "train", "--data", shards, "--backend", "opencv",
           "--checkpoint-dir", str(ckpt), "--trace-keys", str(trace), "--steps", "100000",
           "--checkpoint-every", "100000", *SMALL, "--workers", "2", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                            preexec_fn=default_sigint)


def default_sigint() -> None:
    """Ctrl-C as at a terminal: a test runner started in the background inherits SIGINT ignored, and so
    would every process of the job, hiding what Ctrl-C does to it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


def ignores(pid: int, sig: int) -> bool:
    """Whether process `pid` has `sig` set to SIG_IGN (the SigIgn mask of /proc/PID/status)."""
    mask = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask.split()[1], 16) >> (sig - 1) & 1)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(2))
def test_ctrl_c_to_the_process_group_checkpoints_and_exits_0(shards, tmp_path, attempt):
    ckpt, trace = tmp_path / "ckpt", tmp_path / "keys"
    proc = start(shards, ckpt, trace)
    try:
        wait_for_trace(proc, [Path(f"{trace}.rank0")], 4 * 2)  # 2 steps of 4
        workers = descendants(proc.pid)
        assert len(workers) >= 2  # the augmentation workers (+ forkserver, resource tracker) get it too
        # Whether a worker dying first breaks the step in flight is a race; that none can die is not.
        assert all(ignores(pid, signal.SIGINT) for pid in workers), [ignores(p, signal.SIGINT) for p in workers]
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
    wait_until_gone(workers)


def wait_until_gone(pids: set[int]) -> None:
    deadline = time.monotonic() + 120  # a failure bound only: they go as soon as the trainer is gone
    while [p for p in pids if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)], [Path(f"/proc/{p}/cmdline").read_bytes() for p in pids if alive(p)]


@pytest.mark.slow
def test_kill_9_of_the_trainer_leaves_no_worker_behind(shards, tmp_path):
    proc = start(shards, tmp_path / "ckpt", tmp_path / "keys")
    left: set[int] = set()
    try:
        wait_for_trace(proc, [tmp_path / "keys.rank0"], 4)  # 1 step of 4
        left = descendants(proc.pid)
        assert len(left) >= 3  # 2 workers, the forkserver, the resource tracker
        proc.kill()  # SIGKILL to the trainer alone: no clean-up code runs in it
        proc.wait(timeout=60)
        wait_until_gone(left)
    finally:  # orphans keep the output pipes open: without this a failure would hang in communicate()
        for p in descendants(proc.pid) | left | {proc.pid}:
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_with_only_damaged_checkpoints_is_a_one_line_error(shards, trained_folder, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_folder, ckpt)
    for path in ckpt.glob("checkpoint-*.pt"):
        path.write_bytes(b"")
    error = one_line_error(train(shards, ckpt, "--steps", "7", "--resume"))
    assert "no intact checkpoint" in error and "2 damaged" in error


@pytest.mark.slow
def test_resume_with_another_architecture_is_a_one_line_error(shards, trained_folder, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_folder, ckpt)
    args = [a if a != "resnet18_cifar_small" else "resnet18_cifar_half" for a in SMALL]
    r = cli("train", "--data", shards, "--backend", "opencv", "--checkpoint-dir", str(ckpt), *args,
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


@pytest.mark.slow
def test_read_only_checkpoint_folder_fails_at_start(shards, tmpfs):
    ckpt = tmpfs("1m", read_only=True)
    r = train(shards, ckpt, "--steps", "3")
    error = one_line_error(r)
    assert "is not writable" in error and "Read-only file system" in error
    assert "step 1" not in r.stderr  # found before any work, not at the first checkpoint


@pytest.mark.slow
def test_full_checkpoint_disk_fails_at_start(shards, tmpfs):
    ckpt = tmpfs("4m")
    r = train(shards, ckpt, "--steps", "3")
    error = one_line_error(r)
    assert "MB free; a checkpoint needs about" in error and "step 1" not in r.stderr


def test_a_checkpoint_that_fills_the_disk_leaves_no_partial_file(tmpfs):
    from mocostream.ops import checkpoint
    from mocostream.pipeline.filesystems import Storage

    ckpt = tmpfs("4m")
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device"):
        checkpoint.save(str(ckpt), 1, {"step": 1, "weights": torch.zeros(2 << 20)}, storage=Storage())  # 8 MB
    assert list(ckpt.iterdir()) == []


@pytest.mark.slow
def test_bad_s3_credentials_for_checkpoints_fail_at_start(shards, s3_server):
    s3_server.make_bucket("ckpt-creds")
    env = {**s3_server.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    r = cli("train", "--data", shards, "--backend", "opencv", "--checkpoint-dir", "s3://ckpt-creds/run", *SMALL,
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


@pytest.mark.slow
def test_training_start_up_honours_storage_timeout_and_retries(silent_endpoint, tmp_path):
    r = cli("train", "--data", "s3://bucket/data", "--storage-timeout", "1", "--storage-retries", "1",
            "--checkpoint-dir", str(tmp_path), "--metrics-port", "0",
            env={**SILENT_ENV, "AWS_ENDPOINT_URL": silent_endpoint}, timeout=180)
    error = one_line_error(r)
    assert "cannot read s3://bucket/data" in error and "after 1 retries, --storage-timeout 1 s" in error
    assert r.stderr.count("retry 1/1") == 1


@pytest.mark.slow
def test_shards_create_to_a_silent_endpoint_fails_instead_of_hanging(silent_endpoint, imagenette_small):
    r = cli("shards", "create", str(imagenette_small), "--out", "s3://bucket/x", "--quiet",
            env={**SILENT_ENV, "AWS_ENDPOINT_URL": silent_endpoint, "MOCOSTREAM_STORAGE_TIMEOUT": "1"}, timeout=180)
    assert "Read timeout" in one_line_error(r)


@pytest.mark.slow
def test_shards_create_with_a_wrong_secret_says_so(s3_server, imagenette_small):
    s3_server.make_bucket("create-creds")
    r = cli("shards", "create", str(imagenette_small), "--out", "s3://create-creds/x", "--quiet",
            env={**s3_server.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    error = one_line_error(r)
    assert "S3 refused access" in error and "AWS_SECRET_ACCESS_KEY" in error and "not found" not in error


# ---- hostile shards and manifests ------------------------------------------------------------------------
def jpegs(folder: Path, n: int) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.rglob("*.JPEG"))[:n] or sorted(folder.rglob("*.jp*g"))[:n]]


def write_tar(path: Path, members: list[tuple[str, bytes | int]]) -> None:
    """Members: (name, bytes), or (name, size) for a member of `size` zero bytes streamed from /dev/zero."""
    import tarfile

    with tarfile.open(path, "w") as tf:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, int):
                info.size = content
                with open("/dev/zero", "rb") as zeros:
                    tf.addfile(info, zeros)
            else:
                info.size = len(content)
                tf.addfile(info, io.BytesIO(content))


@pytest.fixture(scope="module")
def hostile_shards(imagenette_small, tmp_path_factory) -> Path:
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path_factory.mktemp("hostile")
    images = jpegs(imagenette_small, 24)
    assert len(images) == 24
    write_tar(out / "a-good.tar", [(f"good{i}.jpg", img) for i, img in enumerate(images[:8])])
    # a member of 65 MiB (over the 64 MiB limit) beside an ordinary sample
    write_tar(out / "b-big-member.tar", [("huge.jpg", 65 << 20), ("fine.jpg", images[8])])
    # a gzip-compressed `.tar` expanding 1 MiB -> 300 MiB: refused unread
    write_tar(out / "bomb-inner.tar", [("bomb.jpg", 300 << 20)])
    (out / "c-bomb.tar").write_bytes(gzip.compress((out / "bomb-inner.tar").read_bytes(), compresslevel=1))
    (out / "bomb-inner.tar").unlink()
    # parquet without a key column, and one with integer keys
    pq.write_table(pa.table({"image": images[9:15]}), out / "d-no-key.parquet")
    pq.write_table(pa.table({"key": list(range(100, 108)), "image": images[16:24]}), out / "e-int-key.parquet")
    # a member name with a newline in it
    write_tar(out / "f-newline.tar", [("two\nlines.jpg", images[0])])
    return out


@pytest.mark.slow
def test_hostile_shards_cost_only_their_own_samples(hostile_shards, tmp_path):
    trace = tmp_path / "keys"
    r = cli("train", "--data", str(hostile_shards), "--backend", "opencv", "--checkpoint-dir", str(tmp_path / "c"),
            "--trace-keys", str(trace), "--epochs", "1", "--steps", "100", *SMALL)
    summary = summary_of(r)
    assert summary["skipped"].get("too_large") == 1
    assert "gzip-compressed tar shard skipped" in r.stderr and "c-bomb.tar" in r.stderr
    keys = Path(f"{trace}.rank0").read_text().splitlines()
    # 8 + 1 + 6 + 8 + 1 = 24 readable samples, 6 batches of 4; a newline in a key is escaped in the trace
    expected = ({f"good{i}" for i in range(8)} | {"fine"} | {f"d-no-key-row{i}" for i in range(6)}
                | {str(k) for k in range(100, 108)} | {"two\\nlines"})
    assert summary["step"] == 6 and len(keys) == 24 and set(keys) == expected


@pytest.mark.slow
def test_keys_rolled_back_by_kill_9_are_cut_from_the_trace_on_resume(shards, tmp_path):
    # (a trace path that looks like a signed URL also shows that checkpoints store the masked config)
    ckpt, trace = tmp_path / "ckpt", tmp_path / "keys?sig=hunter2"
    summary_of(train(shards, ckpt, "--steps", "6", "--stop-after", "4", "--trace-keys", str(trace)))
    keys, losses = Path(f"{trace}.rank0"), Path(f"{trace}.rank0.loss")
    before = keys.read_text()
    assert len(before.split()) == 16 and len(losses.read_text().splitlines()) == 4
    # What a run killed with -9 two steps after its checkpoint leaves behind: steps 5 and 6, never checkpointed.
    keys.write_text(before + "".join(f"rolled-back-{i}\n" for i in range(8)))
    losses.write_text(losses.read_text() + "5 1.0\n6 1.0\n")
    r = train(shards, ckpt, "--steps", "6", "--resume", "--trace-keys", str(trace))
    summary_of(r)
    after = keys.read_text().split()
    assert after[:16] == before.split() and len(after) == 24 == len(set(after)) and "rolled-back-0" not in after
    assert [int(line.split()[0]) for line in losses.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert "written after the checkpoint removed" in r.stderr
    config = torch.load(ckpt / "checkpoint-00000006.pt", weights_only=True)["config"]
    assert config["trace_keys"].endswith("keys?sig=***") and "hunter2" not in json.dumps(config)


@pytest.mark.slow
def test_missing_shard_of_a_brace_pattern_is_skipped_and_counted(shards, tmp_path):
    pattern = f"{shards}/shard-{{000000..000008}}.tar"  # 8 shards exist: 000000 to 000007
    r = cli("train", "--data", pattern, "--backend", "opencv", "--checkpoint-dir", str(tmp_path), "--steps", "2", *SMALL)
    assert summary_of(r)["step"] == 2
    assert "shard not found, skipped" in r.stderr and "shard-000008.tar" in r.stderr


def test_a_missing_shard_of_a_brace_pattern_counts_as_failed(shards):
    from mocostream.ops.metrics import TrainMetrics
    from mocostream.pipeline.loader import LoaderConfig, TwoViewLoader

    metrics = TrainMetrics(0)
    loader = TwoViewLoader(LoaderConfig(data=f"{shards}/shard-{{000000..000008}}.tar", batch_size=4,
                                        image_size=16, backend="opencv", workers=0), observer=metrics)
    assert len(loader.stream.shards) == 8
    assert sum(s.value for fam in metrics.registry.collect() for s in fam.samples
               if s.name == "mocostream_shards_failed_total") == 1


# ---- configuration ---------------------------------------------------------------------------------------
def test_config_file_values_are_type_checked(tmp_path):
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"data": "/d", "resume": "false", "symmetric": "no", "mlp": "false"}))
    r = cli("train", "--config", str(conf), "--print-config")
    options = json.loads(r.stdout)["options"]
    assert (options["resume"], options["symmetric"], options["mlp"]) == (False, False, False)
    for bad, words in [({"batch_size": "eight"}, "batch_size in the config file must be an integer, got 'eight'"),
                       ({"resume": "maybe"}, "resume in the config file must be true or false"),
                       ({"steps": 2.5}, "steps in the config file must be an integer")]:
        conf.write_text(json.dumps({"data": "/d", **bad}))
        assert words in one_line_error(cli("train", "--config", str(conf), "--print-config"))


@pytest.mark.slow
def test_secrets_are_masked_in_print_config_and_error_lines(tmp_path):
    presigned = ("https://bucket.s3.amazonaws.com/shard.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&"
                 "X-Amz-Credential=AKIDEXAMPLE%2F20261201&X-Amz-Signature=deadbeefcafe")
    r = cli("train", "--data", presigned, "--print-config")
    data = json.loads(r.stdout)["options"]["data"]
    assert "deadbeefcafe" not in data and "AKIDEXAMPLE" not in data and "X-Amz-Signature=***" in data
    r = cli("train", "--data", "s3://user:hunter2@127.0.0.1:9/b/shard.tar,s3://user:hunter2@127.0.0.1:9/b/x.tar",
            "--storage-retries", "1", "--storage-timeout", "1", "--checkpoint-dir", str(tmp_path),
            "--metrics-port", "0", env=SILENT_ENV, timeout=180)
    assert r.returncode != 0 and "hunter2" not in r.stderr and "user:***@" in r.stderr


@pytest.mark.parametrize("args,words", [
    (["--dim", "0"], "--dim must be >= 1"),
    (["--recipe", "moco_v3", "--mlp-dim", "0"], "--mlp-dim must be >= 1"),
    (["--bn-splits", "3"], "--bn-splits must divide --batch-size 4"),
])
def test_bad_model_options_give_one_line_errors(args, words, capsys):
    from mocostream.ops.cli import main as cli_main

    assert cli_main(["train", "--data", "x.tar", "--batch-size", "4", *args, "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


@pytest.mark.slow
def test_metrics_port_in_use_is_a_one_line_error(shards, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        args = [a for a in SMALL]
        args[args.index("--metrics-port") + 1] = str(port)
        r = cli("train", "--data", shards, "--backend", "opencv", "--checkpoint-dir", str(tmp_path), *args,
                "--metrics-addr", "127.0.0.1", "--steps", "1")
    assert f"cannot serve metrics on 127.0.0.1:{port}" in one_line_error(r)


def test_metrics_bind_address_is_explained_in_help():
    r = cli("train", "--help")
    assert "0.0.0.0" in r.stdout and "no authentication" in " ".join(r.stdout.split())


# ---- manifests -------------------------------------------------------------------------------------------
def manifest_with(folder: Path, tmp_path: Path, **changes) -> Path:
    manifest = json.loads((folder / "manifest.json").read_text())
    for key, value in changes.items():
        manifest["shards"][0][key] = value
    path = tmp_path / "m" / "manifest.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(manifest))
    for entry in manifest["shards"][1:]:
        (path.parent / entry["name"]).symlink_to(folder / entry["name"])
    return path


@pytest.mark.slow
def test_manifest_names_outside_its_folder_are_refused_unless_allowed(shards, tmp_path):
    folder = Path(shards)
    manifest = manifest_with(folder, tmp_path, name="../outside/shard-000000.tar")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "shard-000000.tar").symlink_to(folder / "shard-000000.tar")
    flags = ["--backend", "opencv", "--checkpoint-dir", str(tmp_path / "c"), "--steps", "1", *SMALL]
    error = one_line_error(cli("train", "--data", str(manifest), *flags))
    assert "'../outside/shard-000000.tar' is outside the manifest's folder" in error
    assert "--allow-external-shards" in error
    assert summary_of(cli("train", "--data", str(manifest), "--allow-external-shards", *flags))["step"] == 1


@pytest.mark.parametrize("name", ["/etc/shard.tar", "http://169.254.169.254/latest/x.tar", "a/../../x.tar"])
def test_external_manifest_names_are_refused(shards, tmp_path, name):
    from mocostream.pipeline.filesystems import Storage
    from mocostream.pipeline.sources import DataSpecError, resolve_shards

    with pytest.raises(DataSpecError, match="outside the manifest's folder"):
        resolve_shards(str(manifest_with(Path(shards), tmp_path, name=name)), storage=Storage())


@pytest.mark.parametrize("changes,words", [
    ({"samples": -5}, "'samples' must be a positive integer, got -5"),
    ({"samples": 0}, "'samples' must be a positive integer, got 0"),
    ({"samples": 2.5}, "'samples' must be a positive integer, got 2.5"),
    ({"samples": "16"}, "'samples' must be a positive integer, got '16'"),
    ({"samples": 30_000_000}, "30000000 samples cannot fit in"),
    ({"samples": 10**30}, f"'samples' must be a positive integer, got {10**30}"),
    ({"bytes": -1}, "'bytes' must be a non-negative integer"),
    ({"name": None}, "needs a 'name' string"),
])
def test_manifest_entries_are_validated(shards, tmp_path, changes, words):
    from mocostream.pipeline.filesystems import Storage
    from mocostream.pipeline.sources import DataSpecError, resolve_shards

    with pytest.raises(DataSpecError, match="shard entry 0") as e:
        resolve_shards(str(manifest_with(Path(shards), tmp_path, **changes)), storage=Storage())
    assert words in str(e.value)


@pytest.mark.slow
def test_a_manifest_claiming_millions_of_samples_is_a_one_line_error(shards, tmp_path):
    manifest = manifest_with(Path(shards), tmp_path, samples=30_000_000)
    r = cli("train", "--data", str(manifest), "--backend", "opencv", "--checkpoint-dir", str(tmp_path / "c"),
            "--steps", "1", *SMALL)
    assert "30000000 samples cannot fit in" in one_line_error(r)
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({"shards": ["shard-000000.tar"]}))
    assert "needs a 'name' string" in one_line_error(cli("train", "--data", str(manifest), "--steps", "1", *SMALL))


def columnar_manifest_with(folder: Path, tmp_path: Path, **changes) -> Path:
    """A clean manifest.json beside a crafted manifest.parquet whose first row carries `changes` (a value
    of another type makes that column's type): what the loader reads instead of the JSON."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mocostream.shards.manifest import columnar_bytes

    manifest = manifest_with(folder, tmp_path)
    doc = json.loads(manifest.read_text())
    table = pq.read_table(io.BytesIO(columnar_bytes(doc, manifest.stat().st_size)))
    for key, value in changes.items():
        column = table.column(key).to_pylist()
        column[0] = value
        kind = pa.float64() if isinstance(value, float) else table.schema.field(key).type
        table = table.set_column(table.schema.get_field_index(key), key, pa.array(column, kind))
    pq.write_table(table, manifest.with_suffix(".parquet"))
    return manifest


@pytest.mark.parametrize("name", ["../outside/shard-000000.tar", "/etc/shard.tar",
                                  "http://169.254.169.254/latest/x.tar", "a/../../x.tar"])
def test_external_columnar_manifest_names_are_refused_unless_allowed(shards, tmp_path, name):
    from mocostream.pipeline import sources
    from mocostream.pipeline.filesystems import Storage, StorageConfig
    from mocostream.pipeline.shard_table import load_shard_table

    manifest = columnar_manifest_with(Path(shards), tmp_path, name=name)
    with pytest.raises(sources.DataSpecError, match="shard entry 0.*outside the manifest's folder"):
        load_shard_table(str(manifest), storage=Storage())
    allowed = Storage(StorageConfig(allow_external_shards=True))  # --allow-external-shards
    assert load_shard_table(str(manifest), storage=allowed)[0].url.endswith(name.rsplit("/", 1)[-1])


@pytest.mark.parametrize("changes,words", [
    ({"samples": -5}, "'samples' must be a positive integer, got -5"),
    ({"samples": 0}, "'samples' must be a positive integer, got 0"),
    ({"samples": 2.5}, "'samples' must be a positive integer, got 2.5"),
    ({"samples": None}, "'samples' is missing"),
    ({"samples": 30_000_000}, "30000000 samples cannot fit in"),
    ({"samples": 2**62}, f"{2**62} samples cannot fit in"),
    ({"bytes": -2}, "'bytes' must be a non-negative integer"),
    ({"name": "shard-000000.txt"}, "not a shard"),
])
def test_columnar_manifest_entries_are_validated(shards, tmp_path, changes, words):
    from mocostream.pipeline.filesystems import Storage
    from mocostream.pipeline.shard_table import load_shard_table
    from mocostream.pipeline.sources import DataSpecError

    with pytest.raises(DataSpecError, match="shard entry 0") as e:
        load_shard_table(str(columnar_manifest_with(Path(shards), tmp_path, **changes)), storage=Storage())
    assert words in str(e.value)


@pytest.mark.slow
def test_a_columnar_manifest_claiming_millions_of_samples_is_a_one_line_error(shards, tmp_path):
    manifest = columnar_manifest_with(Path(shards), tmp_path, samples=30_000_000)
    r = cli("train", "--data", str(manifest), "--backend", "opencv", "--checkpoint-dir", str(tmp_path / "c"),
            "--steps", "1", *SMALL)
    assert "manifest.parquet, shard entry 0" in one_line_error(r)
    assert "30000000 samples cannot fit in" in one_line_error(r)


# ---- labelled evaluation data ----------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_skips_bad_labels_and_a_huge_label_costs_one_class(imagenette_small, tmp_path):
    images = jpegs(imagenette_small, 12)
    members = []
    for i, img in enumerate(images):
        label = {0: b"abc", 1: b"-3", 2: b"20000000"}.get(i, str(i % 2).encode())
        members += [(f"s{i:02d}.jpg", img), (f"s{i:02d}.cls", label)]
    write_tar(tmp_path / "eval-000000.tar", members)
    r = cli("eval", "knn", "--data", str(tmp_path), "--arch", "resnet18_cifar_small", "--image-size", "16")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["train_images"] + result["test_images"] == 10  # 12 - "abc" - "-3"
    assert result["classes"] == 3 and result["skipped"] == {"no_label": 2}
    assert r.stderr.count("eval sample skipped (no_label)") == 2
