"""Commands that do not train answer at once: help, --print-config, one-line errors and `shards inspect` run
the real entry point and never import torch, DALI or OpenCV (seconds of start-up each)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO
from mocostream.shards import create_shards

HEAVY = ("torch", "nvidia.dali", "cv2")


def python(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`python ARGS`, and the heavy modules it imported (-X importtime lists every import on stderr; those
    lines are taken out of the stderr returned)."""
    r = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    imported = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(m for m in imported if any(m == h or m.startswith(h + ".") for h in HEAVY))
    r.stderr = "\n".join(line for line in r.stderr.splitlines() if not line.startswith("import time:"))
    return r, heavy


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`python -m mocostream.ops.cli ARGS`, as a user runs it."""
    return python("-m", "mocostream.ops.cli", *args)


@pytest.mark.parametrize("args,says", [
    (["--help"], "usage: mocostream"),
    (["train", "--help"], "--print-config"),
    (["eval", "--help"], "knn"),
    (["export", "--help"], "--format"),
    (["demo", "--help"], "--workdir"),
    (["shards", "--help"], "create"),
    (["shards", "create", "--help"], "rejects.jsonl"),
    (["curate", "--help"], "balanced subset"),
    (["curate", "select", "--help"], "--keep-fraction"),
    (["train", "--data", "/d", "--batch-size", "64", "--print-config"], '"batch_size": 64'),
])
def test_help_and_print_config_import_no_heavy_module(args, says):
    r, heavy = run_cli(*args)
    assert r.returncode == 0 and says in r.stdout, r.stderr[-3000:]
    assert not heavy, f"`mocostream {' '.join(args)}` imported {heavy}"


@pytest.mark.parametrize("args,says", [
    (["train"], "no training data"),
    (["train", "--data", "/d", "--batch-size", "0"], "--batch-size"),
    (["train", "--data", "/d", "--config", "/nonexistent/c.yaml"], "/nonexistent/c.yaml"),
    (["shards", "inspect", "/nonexistent/shards"], "/nonexistent/shards"),
    (["curate", "/d", "--embed-with", "w", "--out", "/o", "--keep-fraction", "2"], "--keep-fraction"),
])
def test_one_line_errors_import_no_heavy_module(args, says):
    r, heavy = run_cli(*args)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("mocostream: error:") and says in err[0], r.stderr
    assert not heavy, f"`mocostream {' '.join(args)}` imported {heavy}"


def test_shards_inspect_imports_no_heavy_module(imagenette_small, tmp_path):
    classes = sorted(imagenette_small.iterdir())[:2]  # two classes, 24 photos: a small real shard set
    create_shards([str(c) for c in classes], str(tmp_path / "s"), samples_per_shard=10, progress=False)
    r, heavy = run_cli("shards", "inspect", str(tmp_path / "s"), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout)
    assert (info["shards"], info["samples"]) == (3, 24)
    assert not heavy, f"`mocostream shards inspect` imported {heavy}"


def test_the_check_sees_a_heavy_import():
    """The check can fail: an import of OpenCV (the lightest of the three) is seen."""
    r, heavy = python("-c", "import cv2")
    assert r.returncode == 0 and "cv2" in heavy
