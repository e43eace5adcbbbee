"""The whole path: shards made by `mocostream shards create` -> loader -> MoCo trainer -> checkpoints,
traces and a Prometheus endpoint; single process and 2-rank torchrun DDP (gloo) reading from S3."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
import torch

from helpers import TINY, children, cli, finish, tiny_flags, torchrun, wait_for_trace
from mocostream.ops.cli import main as cli_main
from mocostream.ops.config import build_config
from mocostream.ops.ports import free_port
from mocostream.ops.train import Trainer, train


@pytest.fixture(scope="module")
def s3_shards(imagenette_small, s3_server):
    """Both formats on the real S3 server, written by the CLI."""
    s3_server.make_bucket("train-data")
    urls = {}
    for fmt in ("tar", "parquet"):
        url = f"s3://train-data/imagenette-{fmt}"
        r = cli("shards", "create", str(imagenette_small), "--out", url, "--format", fmt,
                "--samples-per-shard", "16", "--quiet", env=s3_server.env)
        assert r.returncode == 0, r.stderr
        urls[fmt] = url
    return urls


def test_single_process_training_with_opencv_backend(labelled_shards, tmp_path):
    cfg = build_config({}, dict(data=str(labelled_shards), steps=3, backend="opencv", recipe="moco_v1",
                                checkpoint_dir=str(tmp_path / "ckpt"), trace_keys=str(tmp_path / "trace"), **TINY))
    summary = train(cfg)
    assert summary["step"] == 3 and math.isfinite(summary["loss"])
    assert Path(summary["checkpoint"]).name == "checkpoint-00000003.pt"
    keys = (tmp_path / "trace.rank0").read_text().split()
    assert len(keys) == 24 and len(set(keys)) == 24


@pytest.mark.parametrize("recipe,over", [
    ("moco_v1", {"symmetric": True}),
    ("moco_v2", {}),  # fp16 (clipping after unscaling): test_moco_fidelity.py
    ("moco_v3", {"arch": "vit_tiny", "dim": 32, "mlp_dim": 64}),
])
def test_clip_grad_bounds_every_step_and_reports_the_norm_before(labelled_shards, tmp_path, recipe, over):
    """--clip-grad on each recipe: what the optimizer steps with has at most that norm, while the metric and the
    log keep the norm the step had before clipping (above the bound here)."""
    clip = 1e-3
    cfg = build_config({}, dict(data=str(labelled_shards), steps=2, backend="opencv", recipe=recipe, clip_grad=clip,
                                checkpoint_dir=str(tmp_path / "ckpt"), **{**TINY, **over}))
    seen = []  # (norm the optimizer steps with, norm reported) per step
    with Trainer(cfg) as trainer:
        def record(optimizer, args, kwargs):
            grads = [p.grad for p in trainer.trainable if p.grad is not None]
            seen.append((torch.nn.utils.get_total_norm(grads).item(), trainer.guard.grad_norm.item()))

        trainer.optimizer.register_step_pre_hook(record)
        summary = trainer.train()
        reported = trainer.metrics.registry.get_sample_value("mocostream_grad_norm", {"rank": "0"})
    assert summary["step"] == 2 and len(seen) == 2 and summary["nonfinite_steps"] == 0
    for used, before in seen:
        assert used <= clip * (1 + 1e-4) and before > 10 * clip
    assert reported == pytest.approx(seen[-1][1])


@pytest.mark.slow
def test_metrics_endpoint_passes_promtool(labelled_shards, tmp_path):
    port = free_port()
    cfg = build_config({}, dict(data=str(labelled_shards), steps=2, backend="dali", checkpoint_dir=str(tmp_path),
                                **{**TINY, "metrics_port": port}))
    with Trainer(cfg) as trainer:  # the endpoint lives as long as the trainer: read it after the last step
        summary = trainer.train()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    assert summary["metrics_port"] == port
    with pytest.raises(OSError):  # closed with the trainer
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
    text = body.decode()
    for name in ("mocostream_samples_total", "mocostream_step_duration_seconds_bucket",
                 "mocostream_data_wait_seconds_bucket", "mocostream_loss", "mocostream_learning_rate",
                 "mocostream_instance_accuracy", "mocostream_images_per_second", "mocostream_epoch",
                 "mocostream_epoch_progress_ratio", "mocostream_storage_read_bytes_total",
                 "mocostream_storage_read_seconds_bucket", "mocostream_storage_retries_total",
                 "mocostream_shards_failed_total", "mocostream_samples_skipped_total"):
        assert f'{name}{{' in text and 'rank="0"' in text, name
    assert 'mocostream_samples_total{rank="0"} 16.0' in text
    for name in ("mocostream_cpu_budget_cpus", "mocostream_threads", "mocostream_cpu_throttled_periods_total",
                 "mocostream_cpu_throttled_seconds_total", "mocostream_cpu_run_delay_seconds_total"):
        assert f'{name}{{' in text, name
    assert 'mocostream_threads{pool="loader",rank="0"} 0.0' in text  # TINY's --workers 0
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'; .ci/run installs it)")
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_trainer_closes_what_it_opened_on_every_exit_path(labelled_shards, tmp_path):
    """An error in start-up (after the metrics endpoint is up) or inside the loop leaves no endpoint, trace file
    or signal handler behind."""
    from mocostream.ops.ports import port_is_free

    handler = signal.getsignal(signal.SIGTERM)
    port = free_port()
    cfg = build_config({}, dict(data=str(labelled_shards), steps=3, backend="opencv", checkpoint_dir=str(tmp_path / "a"),
                                trace_keys=str(tmp_path / "no-such-folder" / "trace"), **{**TINY, "metrics_port": port}))
    with pytest.raises(FileNotFoundError):
        Trainer(cfg)
    assert port_is_free(port) and signal.getsignal(signal.SIGTERM) is handler

    class FailingStep(Trainer):
        def train_step(self, batch, t_data):
            assert self.metrics_port == port and signal.getsignal(signal.SIGTERM) is not handler
            raise RuntimeError("step failed")

    cfg = build_config({}, dict(data=str(labelled_shards), steps=3, backend="opencv", checkpoint_dir=str(tmp_path / "b"),
                                trace_keys=str(tmp_path / "trace"), **{**TINY, "metrics_port": port}))
    with pytest.raises(RuntimeError, match="step failed"), FailingStep(cfg) as trainer:
        trainer.train()
    assert trainer.trace.closed and trainer.loss_trace.closed
    assert port_is_free(port) and signal.getsignal(signal.SIGTERM) is handler


@pytest.mark.slow
def test_resume_continues_the_exact_key_sequence(labelled_shards, tmp_path):
    """A run cut after 3 steps and resumed consumes exactly the keys of an uninterrupted run."""
    base = dict(data=str(labelled_shards), backend="opencv", **TINY)

    def run(steps, name, resume=False):
        return train(build_config({}, dict(base, steps=steps, resume=resume, checkpoint_dir=str(tmp_path / name),
                                           trace_keys=str(tmp_path / f"{name}.keys"))))

    run(20, "whole")  # 160 samples: crosses the 120-sample epoch boundary
    run(9, "cut")
    assert run(20, "cut", resume=True)["step"] == 20
    whole = (tmp_path / "whole.keys.rank0").read_text().split()
    assert (tmp_path / "cut.keys.rank0").read_text().split() == whole
    assert len(set(whole[:120])) == 120


@pytest.mark.slow
def test_budget_run_ends_with_its_clock_and_resume_continues_it(labelled_shards, tmp_path, caplog):
    """--budget-minutes: the run ends when its training seconds reach the budget, with the cosine lr near 0; the
    seconds are checkpointed, so a resumed run (here with the budget extended) continues the schedule."""
    import logging

    from mocostream.moco_core import cosine_lr

    caplog.set_level(logging.INFO, logger="mocostream.train")
    peak = 0.03 * 8 / 256

    def run(budget_minutes, resume=False):
        caplog.clear()
        s = train(build_config({}, dict(data=str(labelled_shards), backend="opencv", budget_minutes=budget_minutes,
                                        resume=resume, checkpoint_dir=str(tmp_path / "ckpt"), **TINY)))
        lrs = [float(m) for r in caplog.records for m in re.findall(r"\| lr ([\d.e-]+) \|", r.getMessage())]
        return s, lrs

    first, lrs = run(0.1)  # 6 s, the loader's start-up included; how many steps fit depends on the machine
    assert not first["stopped"] and first["train_seconds"] >= 6 and first["step"] == len(lrs) >= 1
    assert any(f"budget of 0.1 minutes reached at step {first['step']}" in r.getMessage() for r in caplog.records)
    # the cosine decays with the seconds from the first step on (no warm-up); at 4 significant digits the first
    # step shows the peak itself when the loader started within ~0.02 s of the clock
    assert lrs == sorted(lrs, reverse=True) and lrs[0] <= peak and (len(lrs) == 1 or lrs[-1] < lrs[0])
    state = torch.load(first["checkpoint"], map_location="cpu", weights_only=False)
    assert state["train_seconds"] == first["train_seconds"]
    seconds_before = first["train_seconds"]

    # The extended budget: 9 s more than the first run really trained (a busy machine may have spent the
    # first budget on one slow step), so the resumed run has seconds left, however slow its steps are.
    total = seconds_before + 9
    second, lrs = run(total / 60, resume=True)
    assert second["step"] > first["step"] and second["train_seconds"] >= total
    # The clock went on from the checkpoint: every resumed step is at least seconds_before into the budget, so
    # no lr comes from a schedule restarted at the peak (an lr, unlike a wall-clock difference, does not
    # depend on how long the closing checkpoint took to write on a busy machine).
    bound = cosine_lr(peak, int(1000 * seconds_before / total), 1000)
    assert lrs and max(lrs) <= bound * 1.001, (lrs[:3], bound)


@pytest.mark.slow
def test_two_rank_budget_run_from_s3_stops_every_rank_at_the_same_step(s3_shards, s3_server, tmp_path):
    """The ranks agree on the clock (the slowest one's), so they change lr and stop at the same step. Also the
    opencv-backend tar case of the two-rank S3 run below: disjoint ranks, the checkpoint written to S3."""
    s3_server.make_bucket("checkpoints")
    ckpt = "s3://checkpoints/budget-torch-tar"
    proc = torchrun("train", "--data", s3_shards["tar"], "--backend", "opencv", "--budget-minutes", "0.1",
                    "--checkpoint-dir", ckpt, "--trace-keys", str(tmp_path / "keys"), *tiny_flags(),
                    env=s3_server.env)
    out = finish(proc, 600)
    assert proc.returncode == 0, out[-3000:]
    steps = int(re.search(r"budget of 0.1 minutes reached at step (\d+)", out).group(1))
    traces = [(tmp_path / f"keys.rank{r}").read_text().split() for r in (0, 1)]
    assert steps >= 1 and [len(t) for t in traces] == [steps * 8] * 2
    assert not set(traces[0][:56]) & set(traces[1][:56])  # 120 samples, 60 per rank: none shared in epoch 0
    names = s3_server.filesystem().ls(ckpt.removeprefix("s3://"))
    assert any(n.endswith(f"checkpoint-{steps:08d}.pt") for n in names), names


@pytest.mark.parametrize("args", [
    ["train", "--data", "/nonexistent/folder", "--steps", "1"],
    ["train", "--data", "x.tar", "--arch", "vgg11"],
    ["train", "--data", "x.tar", "--batch-size", "0"],
    ["train", "--data", "x.tar", "--backend", "jax"],
    ["train", "--data", "x.tar", "--precision", "fp16"],
    ["train", "--data", "x.tar", "--budget-minutes", "0"],
    ["train"],
    ["train", "--config", "/nonexistent/c.yaml"],
    ["shards", "create", "/nonexistent/images", "--out", "/tmp/never-written"],
])
def test_cli_bad_arguments_give_one_line_errors(args, capsys):
    assert cli_main([*args, "--metrics-port", "0"] if args[0] == "train" else args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mocostream: error:"), err


@pytest.mark.slow
def test_cli_error_in_a_real_process_has_no_traceback():
    r = cli("train", "--data", "/nonexistent/folder", "--metrics-port", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "mocostream: error: data not found: /nonexistent/folder"


def test_config_file_and_flag_precedence(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("data: /d\nsteps: 7\nbatch-size: 16\nrecipe: moco_v1\n")
    r = cli("train", "--config", str(conf), "--steps", "9", "--print-config")
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)["options"]
    assert (cfg["steps"], cfg["batch_size"], cfg["temperature"], cfg["mlp"]) == (9, 16, 0.07, False)
    conf.write_text("data: /d\nbogus_option: 1\n")
    r = cli("train", "--config", str(conf))
    assert r.returncode == 2 and "bogus_option" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend,fmt", [("dali", "tar"), ("opencv", "parquet"), ("dali", "parquet")])  # opencv/tar: above
def test_two_rank_ddp_from_s3(s3_shards, s3_server, backend, fmt, tmp_path):
    s3_server.make_bucket("checkpoints")
    ckpt = f"s3://checkpoints/{backend}-{fmt}"
    proc = torchrun("train", "--data", s3_shards[fmt], "--steps", "4", "--backend", backend,
                    "--checkpoint-dir", ckpt, "--trace-keys", str(tmp_path / "keys"), *tiny_flags(),
                    env=s3_server.env)
    out = finish(proc, 600)
    assert proc.returncode == 0, out[-3000:]
    traces = [(tmp_path / f"keys.rank{r}").read_text().split() for r in (0, 1)]
    assert len(traces[0]) == len(traces[1]) == 32
    assert not set(traces[0]) & set(traces[1])  # 120 samples, 60 per rank: no overlap within the epoch
    names = s3_server.filesystem().ls(ckpt.removeprefix("s3://"))
    assert any(n.endswith("checkpoint-00000004.pt") for n in names)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_matches_uninterrupted(s3_shards, s3_server, tmp_path):
    """SIGTERM to both ranks mid-run: checkpoint, exit 0; --resume then consumes exactly the keys, and
    computes exactly the losses, of an uninterrupted run of the same length."""
    # The cut run has no end of its own (so the signal always lands mid-run, however fast or slow the
    # machine); the others end by --stop-after at the step the cut run reached + 3. All three share
    # --steps, so their lr schedules are the same.
    def flags(name, *extra):
        return ["--data", s3_shards["tar"], "--backend", "opencv", "--steps", "100000",
                "--checkpoint-dir", str(tmp_path / name), "--trace-keys", str(tmp_path / f"{name}.keys"),
                "--checkpoint-every", "100000", *tiny_flags(workers=1), *extra]  # SIGTERM with a worker pool up

    proc = torchrun("train", *flags("cut"), env=s3_server.env)
    try:
        wait_for_trace(proc, [tmp_path / f"cut.keys.rank{r}" for r in (0, 1)], 16)
        workers = children(proc.pid)
        assert len(workers) == 2
        for pid in workers:  # preemption: every trainer process gets SIGTERM
            os.kill(pid, signal.SIGTERM)
        out = finish(proc, 300)
    finally:
        if proc.poll() is None:
            for pid in children(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    saved = sorted((tmp_path / "cut").glob("checkpoint-*.pt"))
    assert len(saved) == 1
    stopped_at = int(saved[0].stem.split("-")[1])
    assert stopped_at >= 2
    n_before = [len((tmp_path / f"cut.keys.rank{r}").read_text().split()) for r in (0, 1)]
    assert n_before == [stopped_at * 8] * 2  # every consumed batch was checkpointed
    steps = stopped_at + 3
    for args in (flags("cut", "--resume", "--stop-after", "3"), flags("whole", "--stop-after", str(steps))):
        proc = torchrun("train", *args, env=s3_server.env)
        out = finish(proc, 600)
        assert proc.returncode == 0, out[-3000:]
    for r in (0, 1):
        cut, whole = (tmp_path / f"{n}.keys.rank{r}" for n in ("cut", "whole"))
        assert cut.read_text() == whole.read_text() and len(whole.read_text().split()) == steps * 8
        cut_loss, whole_loss = (Path(f"{p}.loss").read_text() for p in (cut, whole))
        assert cut_loss == whole_loss and len(whole_loss.splitlines()) == steps


@pytest.mark.slow
def test_bf16_on_cpu_trains_channels_last_and_keeps_fp32_weights(labelled_shards, tmp_path):
    """--precision bf16 on CPU: autocast plus channels_last (oneDNN's fast bf16 path); parameters and checkpoints
    stay fp32. auto keeps CPU runs in fp32."""
    from mocostream.ops.train import build_model, uses_bf16

    cpu = torch.device("cpu")
    assert not uses_bf16(build_config({}, dict(data="x", **TINY)), cpu)
    cfg = build_config({}, dict(data=str(labelled_shards), steps=3, backend="dali", precision="bf16",
                                checkpoint_dir=str(tmp_path), **TINY))
    assert uses_bf16(cfg, cpu)
    model = build_model(cfg, 1, cpu)
    assert model.encoder_q.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    summary = train(cfg)
    assert summary["step"] == 3 and math.isfinite(summary["loss"])
    state = torch.load(summary["checkpoint"], map_location="cpu", weights_only=False)
    assert {t.dtype for t in state["model"].values() if t.is_floating_point()} == {torch.float32}


@pytest.mark.slow
def test_compact_log_line_every_n_steps(labelled_shards, tmp_path, caplog):
    import logging
    import re

    caplog.set_level(logging.INFO, logger="mocostream.train")
    cfg = build_config({}, dict(data=str(labelled_shards), steps=4, backend="opencv", checkpoint_dir=str(tmp_path),
                                **{**TINY, "log_every": 2}))
    train(cfg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ") and "ETA" in r.getMessage()]
    pattern = (r"step (\d+)/4 \| [\d.]+ img/s \| data wait \d+% \| loss [\d.]+ \| lr [\d.e-]+ \| acc [\d.]+ \| "
               r"gnorm [\d.e+-]+ \| ETA \d+:\d\d:\d\d")
    assert [int(re.fullmatch(pattern, line).group(1)) for line in lines] == [2, 4], lines
    assert lines[-1].endswith("ETA 0:00:00")
    # a run cut between log steps (preemption, a spent --budget-minutes) still reports its last step's loss
    cfg = build_config({}, dict(data=str(labelled_shards), steps=4, stop_after=3, backend="opencv",
                                checkpoint_dir=str(tmp_path / "cut"), **{**TINY, "log_every": 2}))
    summary = train(cfg)
    assert summary["stopped"] and summary["step"] == 3 and math.isfinite(summary["loss"])
