"""Choosing the augmentation backend (auto, dali, opencv; torch as the old name of opencv), and the loader's
vocabularies (recipe names, backend names, skip reasons) defined once: in pipeline/vocabulary.py and
pipeline/skip_log.py, and nowhere typed again."""
from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO
from mocostream.pipeline import vocabulary
from mocostream.pipeline.skip_log import EVAL_SKIP_REASONS, SKIP_REASONS
from mocostream.pipeline.vocabulary import BACKEND_ALIASES, BACKEND_CHOICES, BACKENDS, RECIPES, pick_backend

SOURCE_DIRS = ("pipeline", "ops", "moco_core", "shards", "bench")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mocostream.ops.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def shards(imagenette_small, tmp_path_factory) -> Path:
    from mocostream.shards.create import create_shards

    out = tmp_path_factory.mktemp("backend-shards")
    create_shards([str(imagenette_small)], str(out), fmt="tar", samples_per_shard=40, progress=False, dedup="none")
    return out


# ---------------------------------------------------------------- choosing the backend

def test_pick_backend_auto_follows_the_device_and_says_why():
    assert pick_backend("auto", on_gpu=True) == ("dali", "auto: a CUDA GPU")
    backend, why = pick_backend("auto", on_gpu=False)
    assert backend == "opencv" and why.startswith("auto: no CUDA GPU")
    assert pick_backend("opencv", on_gpu=True) == ("opencv", "as asked")
    assert pick_backend("dali", on_gpu=True) == ("dali", "as asked")
    backend, why = pick_backend("dali", on_gpu=False)  # asked for on CPU: kept, with a one-line hint
    assert backend == "dali" and "opencv backend" in why and "faster" in why
    assert pick_backend("torch", on_gpu=False) == ("opencv", "as asked")


@pytest.mark.slow
def test_auto_trains_with_opencv_on_this_machine_and_logs_it_once(shards, tmp_path):
    """The default (auto) in a real training run: OpenCV without a CUDA GPU (DALI with one), said in one
    start line with the reason; the CPU budget line counts the loader's processes as workers."""
    r = run_cli("train", "--data", str(shards), "--steps", "1", "--arch", "resnet18_cifar_small", "--image-size", "16",
                "--batch-size", "4", "--queue-size", "64", "--workers", "0", "--log-every", "1", "--no-progress",
                "--metrics-port", "0", "--checkpoint-dir", str(tmp_path / "ck"))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if "augmentation backend:" in line]
    expected = ("dali (auto: a CUDA GPU)" if torch.cuda.is_available() else
                "opencv (auto: no CUDA GPU, OpenCV is the faster loader on CPU)")
    assert len(lines) == 1 and lines[0].endswith("augmentation backend: " + expected), lines
    if not torch.cuda.is_available():
        assert "loader workers" in r.stderr and "pre-flight image check" not in r.stderr  # a DALI-only step
    assert "deprecated" not in r.stderr


def test_torch_is_still_accepted_as_opencv_with_a_notice(shards, tmp_path, caplog):
    """A config file written before the rename (`backend: torch`) keeps working: the old name becomes
    opencv, with one line saying so; the same for the loader's own config."""
    from mocostream.ops.config import build_config
    from mocostream.pipeline.loader import LoaderConfig, TwoViewLoader

    conf = tmp_path / "old.yaml"
    conf.write_text(f"data: {shards}\nbackend: torch\n")
    r = run_cli("train", "--config", str(conf), "--print-config")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["options"]["backend"] == "opencv"
    notices = r.stderr.strip().splitlines()
    assert len(notices) == 1 and notices[0].endswith(
        "backend 'torch' is a deprecated name: use 'opencv' (the same backend)"), notices

    caplog.set_level(logging.INFO)
    assert build_config({}, {"data": "/d", "backend": "torch"}, environ={}).backend == "opencv"
    assert build_config({}, {"data": "/d"}, environ={"MOCOSTREAM_BACKEND": "torch"}).backend == "opencv"
    assert sum("deprecated name" in r.getMessage() for r in caplog.records) == 2
    caplog.clear()
    loader = TwoViewLoader(LoaderConfig(data=str(shards), batch_size=4, image_size=16, backend="torch", workers=0))
    assert loader.backend == "opencv"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("deprecated name" in m for m in messages) == 1
    assert "augmentation backend: opencv (as asked)" in messages


def test_an_unknown_backend_is_refused_naming_the_choices(shards):
    from mocostream.pipeline.loader import LoaderConfig, TwoViewLoader

    with pytest.raises(ValueError, match="unknown backend 'jax'; choose from auto, dali, opencv"):
        TwoViewLoader(LoaderConfig(data=str(shards), backend="jax"))


# A rank as torchrun stops it: SIGTERM to its whole process group (os.killpg), forkserver and workers included.
GROUP_SIGTERM = r"""
import os, signal
from pathlib import Path
from mocostream.pipeline.worker_pool import augmentation_pool

stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
pool = augmentation_pool(1)
worker = pool.submit(os.getpid).result()
forkserver = next(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                  and b"multiprocessing.forkserver" in (p / "cmdline").read_bytes()
                  and f"PPid:\t{os.getpid()}\n" in (p / "status").read_text())
ignored = int(next(l for l in (Path("/proc") / str(forkserver) / "status").read_text().splitlines()
                   if l.startswith("SigIgn:")).split()[1], 16)
os.killpg(0, signal.SIGTERM)
after = pool.submit(os.getpid).result()  # the trainer's next batch, while it checkpoints
pool.shutdown()
print(stopping == [True], bool(ignored & (1 << (signal.SIGTERM - 1))), after == worker)
"""


def test_the_opencv_workers_survive_a_sigterm_to_the_process_group():
    """torchrun stops a rank with SIGTERM to its process group. The trainer checkpoints; its augmentation
    workers and their forkserver ignore the signal, so the pool keeps working meanwhile (a dead forkserver
    would break it: BrokenProcessPool, and no checkpoint)."""
    r = subprocess.run([sys.executable, "-c", GROUP_SIGTERM], cwd=REPO, capture_output=True, text=True,
                       timeout=300, start_new_session=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["True", "True", "True"], r.stdout + r.stderr[-3000:]


# ---------------------------------------------------------------- vocabularies, defined once

def python_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py"))


def string_lists(tree: ast.AST):
    """(line, values) of every tuple/list/set literal of two or more strings, and of comma-joined strings."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2 and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            yield node.lineno, {e.value for e in node.elts}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "," in node.value:
            yield node.lineno, set(node.value.split(","))


def test_recipe_backend_and_reason_lists_are_typed_once():
    """Nowhere outside their definitions is a list of recipe names, backend names or skip reasons typed
    again: the choices, checks and benchmarks import them."""
    vocabularies = {
        "recipe names": (set(RECIPES), {"pipeline/vocabulary.py"}),
        "backend names": (set(BACKEND_CHOICES) | set(BACKEND_ALIASES), {"pipeline/vocabulary.py"}),
        "skip reasons": (set(SKIP_REASONS) | set(EVAL_SKIP_REASONS),
                         {"pipeline/skip_log.py", "pipeline/image_check.py"}),
    }
    retyped = []
    for path in python_files():
        name = path.relative_to(REPO).as_posix()
        for line, values in string_lists(ast.parse(path.read_text())):
            for what, (names, homes) in vocabularies.items():
                if values <= names and name not in homes:
                    retyped.append(f"{name}:{line}: {what} {sorted(values)}")
    assert not retyped, retyped


def test_every_recipe_table_covers_exactly_the_recipes():
    """Settings kept per recipe (augmentation parameters, training presets, the CIFAR bench's T and lr) name
    every recipe and nothing else, and the choices offered are the recipes."""
    import importlib.util

    from mocostream.ops.config import RECIPE_DEFAULTS, TrainConfig
    from mocostream.ops.options import choices_of
    from mocostream.pipeline.aug_params import _RECIPES
    from mocostream.pipeline.augment_reference import reference_transform

    spec = importlib.util.spec_from_file_location("learn_cifar", REPO / "bench" / "learn_cifar.py")
    learn_cifar = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(learn_cifar)
    for table in (_RECIPES, RECIPE_DEFAULTS, learn_cifar.TEMPERATURE, learn_cifar.CPU_BASE_LR):
        assert tuple(table) == RECIPES
    assert choices_of(TrainConfig.__dataclass_fields__["recipe"]) == RECIPES
    for recipe in RECIPES:
        reference_transform(recipe, 32)
    with pytest.raises(ValueError, match="simclr"):
        reference_transform("simclr", 32)
    assert set(BACKENDS) < set(BACKEND_CHOICES) and not set(BACKEND_ALIASES) & set(BACKEND_CHOICES)
    assert vocabulary.AUTO in BACKEND_CHOICES and set(BACKEND_ALIASES.values()) <= set(BACKENDS)


# Calls that count a skipped sample or carry the reason of one, and the argument that holds it.
REASON_ARGS = {"count": 0, "lost": 0, "_skip": 0, "UndecodableImage": 0, "Sample": 2}


def _strings(node: ast.AST | None) -> set[str]:
    """The strings an expression can be: a literal, or either branch of `a if c else b`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return _strings(node.body) | _strings(node.orelse)
    return set()


def _holds_reasons(node: ast.AST) -> bool:
    """A name, attribute or item of something called reason(s), or a Counter of skips."""
    if isinstance(node, ast.Subscript):
        node = node.value
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return "reason" in name or "skipped" in name


def _call_reasons(node: ast.Call) -> set[str]:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if name == "append" and isinstance(func, ast.Attribute) and _holds_reasons(func.value):
        return _strings(node.args[0])
    if name in REASON_ARGS:
        index = REASON_ARGS[name]
        args = node.args[index] if len(node.args) > index else None
        return _strings(args) | {v for k in node.keywords if k.arg in ("reason", "error") for v in _strings(k.value)}
    return set()


def reasons_in(path: Path) -> set[str]:
    """The skip reasons a module of the pipeline counts: passed to the calls that count or carry them,
    assigned to a reason / a skip Counter's item, or returned by the image check."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            found |= _call_reasons(node)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                pairs = (zip(target.elts, node.value.elts) if isinstance(target, ast.Tuple)
                         and isinstance(node.value, ast.Tuple) else [(target, node.value)])
                found |= {v for t, value in pairs if _holds_reasons(t) for v in _strings(value)}
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Subscript) \
                and _holds_reasons(node.target):
            found |= _strings(node.target.slice)
        elif isinstance(node, ast.Return) and path.name == "image_check.py":
            found |= _strings(node.value)
    return found


def test_every_skip_reason_in_the_code_is_in_the_metrics_list():
    """The metric's list is SKIP_REASONS itself; every reason the pipeline's code counts is in it (or is one
    of evaluation's own), and every listed reason is still counted somewhere: a new reason cannot be
    forgotten, nor an old one linger."""
    from mocostream.ops.metrics import TrainMetrics

    found = {}
    for path in sorted((REPO / "pipeline").glob("*.py")):
        for reason in reasons_in(path):
            found.setdefault(reason, []).append(path.name)
    listed = set(SKIP_REASONS) | set(EVAL_SKIP_REASONS)
    assert not set(found) - listed, {r: found[r] for r in set(found) - listed}
    assert not listed - set(found), f"listed but never counted: {sorted(listed - set(found))}"
    assert {"partial_last_batch", "decoder_error", "epoch_remainder"} <= set(found)
    assert len(set(SKIP_REASONS)) == len(SKIP_REASONS) and not set(SKIP_REASONS) & set(EVAL_SKIP_REASONS)

    registry = TrainMetrics(0).registry  # each exported at 0 from the start
    for reason in SKIP_REASONS:
        assert registry.get_sample_value("mocostream_samples_skipped_total", {"rank": "0", "reason": reason}) == 0
