"""ops/prometheus (scrape config, alert rules and their promtool unit tests) and ops/grafana (dashboard):
promtool checks, dashboard structure, names against the trainer's metrics, and every PromQL expression
evaluated by a real Prometheus scraping a real 2-rank training run."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from mocostream.ops import local_stack
from mocostream.ops.ports import free_port, port_is_free

PROM_DIR = REPO / "ops" / "prometheus"
DASHBOARD = json.loads((REPO / "ops" / "grafana" / "mocostream.json").read_text())
RULES = yaml.safe_load((PROM_DIR / "rules.yml").read_text())
ALERTS = [r for g in RULES["groups"] for r in g["rules"] if "alert" in r]
# Grafana's variables, as a query runs with "All" selected; $__rate_interval at a 1 s scrape.
SUBSTITUTE = {"$__rate_interval": "10s", "$job": ".+", "$rank": ".+"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'; .ci/run installs it)")
    return path


def panels() -> list[dict]:
    out = []
    for p in DASHBOARD["panels"]:
        out += [p] if p["type"] != "row" else p.get("panels", [])
    return [p for p in out if p["type"] != "row"]


def is_gpu_panel(panel: dict) -> bool:
    """DCGM exporter panels: empty on machines without NVIDIA GPUs, so exempt from 'returns data'.
    Ingest and curation panels (the shard tool's and `curate embed`'s metrics) are empty during a training run too."""
    return all(any(m in t["expr"] for m in OTHER_JOBS) for t in panel["targets"])


OTHER_JOBS = ("DCGM_FI_", "mocostream_ingest_", "mocostream_curate_")  # series a training run does not export


def substitute(expr: str) -> str:
    for var, value in SUBSTITUTE.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown variable in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(mocostream_\w+|DCGM_\w+)\b", expr))
    return names | ({"up"} if re.search(r"\bup\{", expr) else set())


def exported_names() -> set[str]:
    """Sample names the trainer's registry exports, from the metric families' types."""
    from mocostream.ops.metrics import EmbedMetrics, TrainMetrics
    from mocostream.shards.metrics import IngestMetrics

    names = set()
    for family in [*TrainMetrics(0).registry.collect(), *IngestMetrics(0).registry.collect(),
                   *EmbedMetrics(0).registry.collect()]:
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


def test_config_and_rules_pass_promtool():
    tool = promtool()
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "rules.yml"]):
        r = subprocess.run([tool, *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_is_unit_tested_firing_and_quiet():
    r = subprocess.run([promtool(), "test", "rules", "rules_test.yml"], cwd=PROM_DIR, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    tests = yaml.safe_load((PROM_DIR / "rules_test.yml").read_text())
    cases = [c for t in tests["tests"] for c in t.get("alert_rule_test", [])]
    for alert in ALERTS:
        mine = [c for c in cases if c["alertname"] == alert["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{alert['alert']}: no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{alert['alert']}: no case where it stays quiet"


def test_rules_cover_the_failure_modes():
    exprs = {a["alert"]: a["expr"] for a in ALERTS}
    wanted = {  # failure mode -> a metric its alert must read
        "stalled": "mocostream_samples_total", "non-finite": "mocostream_nonfinite_steps_total",
        "skips": "mocostream_samples_skipped_total", "data wait": "mocostream_data_wait_seconds_sum",
        "retries": "mocostream_storage_retries_total", "failed shards": "mocostream_shards_failed_total",
        "rank missing": "up", "cpu quota": "mocostream_cpu_throttled_seconds_total"}
    used = set().union(*(metric_names(e) for e in exprs.values()))
    assert set(wanted.values()) <= used, set(wanted.values()) - used
    assert any("offset" in e and "mocostream_samples_total" in e for e in exprs.values()), "throughput vs recent level"
    for alert in ALERTS:
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]


def test_dashboard_is_importable_with_a_datasource_variable():
    for key in ("title", "uid", "schemaVersion", "panels", "templating", "time"):
        assert key in DASHBOARD, key
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    ids, boxes = set(), []
    for p in DASHBOARD["panels"] + [q for p in DASHBOARD["panels"] for q in p.get("panels", [])]:
        assert p["id"] not in ids, f"duplicate panel id {p['id']}"
        ids.add(p["id"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for other in boxes:  # no two panels overlap on the grid
            assert (g["x"] + g["w"] <= other["x"] or other["x"] + other["w"] <= g["x"]
                    or g["y"] + g["h"] <= other["y"] or other["y"] + other["h"] <= g["y"]), p["title"]
        boxes.append(g)
    for p in panels():
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip()
            for var in re.findall(r"\$\{?(\w+)", t["expr"]):
                assert var in variables or var.startswith("__"), f"{p['title']}: undefined ${var}"


def test_dashboard_shows_what_the_issue_lists():
    by_metric: dict[str, list[str]] = {}
    for p in panels():
        for t in p["targets"]:
            for name in metric_names(t["expr"]):
                by_metric.setdefault(name, []).append(p["title"])
    for name in ("mocostream_samples_total", "mocostream_step_duration_seconds_bucket",
                 "mocostream_data_wait_seconds_sum", "mocostream_loss", "mocostream_learning_rate",
                 "mocostream_instance_accuracy", "mocostream_knn_top1", "mocostream_samples_skipped_total",
                 "mocostream_storage_read_bytes_total", "mocostream_storage_read_seconds_bucket",
                 "mocostream_storage_retries_total", "mocostream_epoch", "mocostream_epoch_progress_ratio",
                 "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED",
                 # CPU: budget and threads, busy node (run delay) vs small quota (throttling)
                 "mocostream_cpu_budget_cpus", "mocostream_threads", "mocostream_cpu_used_seconds_total",
                 "mocostream_cpu_run_delay_seconds_total", "mocostream_cpu_throttled_seconds_total",
                 "mocostream_cpu_throttled_periods_total"):
        assert name in by_metric, f"no panel shows {name}"
    exprs = [t["expr"] for p in panels() for t in p["targets"]]
    assert any("by (job) (rate(mocostream_samples_total" in e for e in exprs), "images/s overall"
    assert any("by (job, rank) (rate(mocostream_samples_total" in e for e in exprs), "images/s per rank"
    quantiles = {re.match(r"histogram_quantile\((0\.\d+)", e).group(1) for e in exprs if "step_duration_seconds_bucket" in e}
    assert quantiles >= {"0.5", "0.99"}, "step-time quantiles"
    assert any("by (job, reason)" in e and "skipped" in e for e in exprs), "skips by reason"


def test_dashboard_shows_the_curate_embed_job():
    exprs = [t["expr"] for p in panels() for t in p["targets"]]
    used = set().union(*(metric_names(e) for e in exprs))
    assert {"mocostream_curate_images_total", "mocostream_curate_progress_ratio", "mocostream_curate_shards_done",
            "mocostream_curate_samples_skipped_total"} <= used
    assert any("by (job, rank) (rate(mocostream_curate_images_total" in e for e in exprs), "embed images/s per rank"


def test_dashboard_and_rules_read_only_metrics_the_trainer_exports():
    exported = exported_names()
    used = {n for p in panels() for t in p["targets"] for n in metric_names(t["expr"])}
    used |= {n for a in ALERTS for n in metric_names(a["expr"])}
    unknown = {n for n in used if n.startswith("mocostream_")} - exported
    assert not unknown, f"not exported by ops/metrics.py: {sorted(unknown)}"


# --- a real Prometheus scraping a real training run -------------------------------------------------

def api(base: str, path: str, **params) -> dict:
    url = f"{base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:  # a bad query answers 400 with the parse error in the body
        return json.load(e)


@pytest.mark.slow
def test_real_prometheus_evaluates_every_dashboard_and_rule_expression(tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (Debian package 'prometheus'; .ci/run installs it)")
    from mocostream.ops.demo import write_images

    write_images(tmp_path / "images", per_class=8, size=48)  # 8 classes: training data and the kNN set
    r = subprocess.run([sys.executable, "-m", "mocostream.ops.cli", "shards", "create", str(tmp_path / "images"), "--out",
                        str(tmp_path / "shards"), "--samples-per-shard", "16", "--quiet"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    port = free_port()
    while not port_is_free(port + 1):
        port = free_port()
    prom_port = free_port()
    base = f"http://127.0.0.1:{prom_port}"
    prom = local_stack.start_prometheus(tmp_path / "state", prom_port, [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"],
                                        scrape_interval="1s")
    train = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
         "-m", "mocostream.ops.cli", "train", "--data", str(tmp_path / "shards"), "--steps", "100000", "--backend", "dali",
         "--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--queue-size", "128", "--workers", "1",
         "--log-every", "1", "--checkpoint-every", "3", "--checkpoint-dir", str(tmp_path / "ckpt"),
         "--metrics-port", str(port), "--metrics-addr", "127.0.0.1", "--knn-data", str(tmp_path / "images"),
         "--knn-every", "4", "--no-progress"],
        cwd=REPO, stdout=open(tmp_path / "train.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    trainer = {"pid": train.pid, "argv0": Path(sys.executable).name, "started": local_stack.start_ticks(train.pid)}
    try:
        local_stack.wait_for("Prometheus", lambda: local_stack.http_ok(f"{base}/-/ready"), 300, prom)
        dashboard = [(p, t["expr"]) for p in panels() for t in p["targets"]]
        # Instant queries only see series scraped in the last 5 minutes: query while the job runs.
        deadline, empty = time.time() + 600, None  # a failure bound: the loop ends when every panel has data
        while time.time() < deadline:
            assert train.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            series = {}
            for p, expr in dashboard:
                answer = api(base, "query", query=substitute(expr))
                assert answer["status"] == "success", (p["title"], expr, answer)
                series[p["title"]] = series.get(p["title"], 0) + len(answer["data"]["result"])
            empty = [title for title, n in series.items() if n == 0
                     and not is_gpu_panel(next(p for p in panels() if p["title"] == title))]
            if not empty:
                break
            time.sleep(2)
        assert not empty, f"dashboard panels without data: {empty}\n" + (tmp_path / "train.log").read_text()[-3000:]

        for alert in ALERTS:  # each rule expression parses and evaluates on live data
            answer = api(base, "query", query=alert["expr"])
            assert answer["status"] == "success", (alert["alert"], answer)
        groups = api(base, "rules")["data"]["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(loaded) == {a["alert"] for a in ALERTS}
        assert all(r["health"] == "ok" for r in loaded.values()), [(n, r.get("lastError")) for n, r in loaded.items()]
        # A healthy run fires nothing (an alert can be pending only for the first scrapes' rate windows).
        firing = [r["name"] for r in loaded.values() if r["state"] == "firing"]
        assert not firing, firing
        # Every metric name the dashboard and the rules read is one the run exports.
        live = set(api(base, "label/__name__/values")["data"])
        used = {n for _, e in dashboard for n in metric_names(e)} | {n for a in ALERTS for n in metric_names(a["expr"])}
        trainer_names = {n for n in used if not n.startswith(OTHER_JOBS)}
        assert trainer_names <= live, sorted(trainer_names - live)
        up = api(base, "query", query='up{job="mocostream"}')["data"]["result"]
        assert sorted(s["value"][1] for s in up) == ["1", "1"]
    finally:
        local_stack.stop("train", trainer, grace=60)  # SIGTERM: the ranks checkpoint and exit
        train.wait(timeout=30)
        local_stack.stop("prometheus", prom, grace=30)
    assert "checkpoint (stop)" in (tmp_path / "train.log").read_text()
