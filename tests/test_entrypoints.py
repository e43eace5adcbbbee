"""The demo and the benchmark scripts run as a user would run them."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO


def run(args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_demo_runs_end_to_end(tmp_path):
    r = run(["-m", "mocostream.ops.cli", "demo", "--workdir", str(tmp_path), "--steps", "4", "--metrics-port", "0"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[demo] 4 MoCo steps" in r.stdout
    assert f"augmentation backend: {'dali' if torch.cuda.is_available() else 'opencv'} (auto" in r.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 4 and (tmp_path / "checkpoints" / "checkpoint-00000004.pt").exists()
    assert len((tmp_path / "trace-keys.rank0").read_text().split()) == 4 * 32
    # A second run reuses the shards it made.
    r = run(["-m", "mocostream.ops.cli", "demo", "--workdir", str(tmp_path), "--steps", "1", "--metrics-port", "0"])
    assert r.returncode == 0 and "reusing the shards" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("backend", ["dali", "opencv", "reference"])
def test_loader_benchmark_prints_images_per_second(imagenette_small, backend):
    r = run(["bench/loader.py", "--images", str(imagenette_small), "--backend", backend, "--seconds", "0.5",
             "--batch-size", "8", "--image-size", "64", "--workers", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["images_per_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would really run")
def test_gpu_check_exits_at_once_without_a_gpu():
    r = run(["bench/gpu_check.py"], timeout=120)
    assert r.returncode == 3 and "no CUDA GPU" in r.stdout
