"""Installed from its wheel, mocostream lives under its own name: beside another project's `ops`, both import."""
from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OTHER_OPS = """[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "someone-elses-ops"
version = "1.0"

[tool.setuptools]
packages = ["ops"]
"""


def run(*argv, cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (argv, r.stdout[-2000:], r.stderr[-2000:])
    return r


def build_wheels(tmp_path: Path) -> Path:
    other = tmp_path / "other"
    (other / "ops").mkdir(parents=True)
    (other / "ops" / "__init__.py").write_text("OWNER = 'someone else'\n")
    (other / "pyproject.toml").write_text(OTHER_OPS)
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, REPO, other,
        cwd=tmp_path)
    return wheels


def fresh_venv(tmp_path: Path) -> Path:
    """A new venv with no mocostream; it sees this venv's dependencies (torch, DALI: gigabytes) through a path
    entry, which adds the folder but runs none of its .pth files, so the editable install here stays invisible."""
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.mark.slow
def test_the_wheel_installs_under_mocostream_beside_a_package_that_owns_ops(tmp_path):
    wheels = build_wheels(tmp_path)
    ours = next(wheels.glob("mocostream-*.whl"))
    names = zipfile.ZipFile(ours).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"mocostream"}, f"the wheel installs top-level names other than mocostream: {top}"
    assert "mocostream/curate/select.py" in names and "mocostream/ops/cli_curate.py" in names
    assert "mocostream/ops/prometheus/rules.yml" in names and "mocostream/ops/grafana/mocostream.json" in names

    venv = fresh_venv(tmp_path)
    run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps",
        *sorted(wheels.glob("*.whl")), cwd=tmp_path)
    check = ("import ops, mocostream.ops.cli, mocostream.pipeline.plan, mocostream.shards.create, "
             "mocostream.moco_core, mocostream.curate.select; assert ops.OWNER == 'someone else', ops.__file__; "
             "assert 'site-packages' in mocostream.ops.cli.__file__, mocostream.ops.cli.__file__; print('both')")
    assert run(venv / "bin" / "python", "-c", check, cwd=tmp_path).stdout.strip() == "both"
    assert "shards" in run(venv / "bin" / "mocostream", "--help", cwd=tmp_path).stdout
