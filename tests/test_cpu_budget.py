"""The CPU budget (affinity, cgroup quota, --cpus, per local rank), the thread split, the thread tuner, and the
CPU metrics on a real /metrics endpoint. Cgroup files are real files in a temporary folder laid out as the
kernel lays them out."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request

import pytest

from conftest import REPO
from mocostream.ops.cpu_budget import (CpuBudget, CpuBudgetError, cgroup_dirs, detect_budget, quota_of, shard_tool_defaults,
                            ThreadSplit, split_threads, throttling)
from mocostream.ops.cpu_threads import openmp_wait
from mocostream.ops.thread_tuner import ThreadTuner, ladder


def write(folder, **files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)
    return folder


def test_affinity_alone_sets_the_budget():
    budget = detect_budget(affinity=8, dirs=[], local_ranks=1)
    assert budget.cpus == 8 and budget.limits == {"affinity": 8}
    assert "8 per rank" in budget.describe() and "affinity 8" in budget.describe()


def test_real_process_budget_is_within_its_affinity():
    assert 1 <= detect_budget(local_ranks=1).cpus <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("files, cpus", [
    ({"cpu_max": "400000 100000\n"}, 4),          # v2: 4 CPUs
    ({"cpu_max": "150000 100000\n"}, 1),          # 1.5 CPUs: two threads would run half-throttled
    ({"cpu_max": "max 100000\n"}, 8),             # no quota: the affinity decides
    ({"cpu_cfs_quota_us": "300000\n", "cpu_cfs_period_us": "100000\n"}, 3),  # v1
    ({"cpu_cfs_quota_us": "-1\n", "cpu_cfs_period_us": "100000\n"}, 8),     # v1, no quota
    ({"cpu_max": "50000 100000\n"}, 1),           # half a CPU: still one thread
])
def test_cgroup_quota_limits_the_budget(tmp_path, files, cpus):
    folder = write(tmp_path / "cg", **files)
    assert detect_budget(affinity=8, dirs=[folder], local_ranks=1).cpus == cpus


def test_tightest_quota_on_the_way_to_the_root_wins(tmp_path):
    root = write(tmp_path, **{"cgroup.controllers": "cpu memory\n"})
    pod = write(root / "kubepods" / "pod1", cpu_max="200000 100000\n")
    container = write(pod / "c1", cpu_max="400000 100000\n")
    proc = write(tmp_path / "proc", cgroup="0::/kubepods/pod1/c1\n") / "cgroup"
    dirs = cgroup_dirs(root, str(proc))
    assert dirs[:3] == [container, pod, root / "kubepods"] and dirs[-1] == root
    budget = detect_budget(affinity=64, dirs=dirs, local_ranks=1)
    assert budget.cpus == 2 and budget.limits["cgroup quota"] == 2


def test_v1_cpu_controller_path_is_found(tmp_path):
    cpu = write(tmp_path / "root" / "cpu,cpuacct" / "docker" / "abc", cpu_cfs_quota_us="200000\n",
                cpu_cfs_period_us="100000\n")
    proc = write(tmp_path / "proc", cgroup="5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n") / "cgroup"
    dirs = cgroup_dirs(tmp_path / "root", str(proc))
    assert dirs[0] == cpu and quota_of(dirs[0]) == 2.0


def test_container_path_missing_falls_back_to_the_mount(tmp_path):
    cpu = write(tmp_path / "root" / "cpu", cpu_cfs_quota_us="100000\n", cpu_cfs_period_us="100000\n")
    proc = write(tmp_path / "proc", cgroup="3:cpu:/host/view/of/me\n") / "cgroup"
    assert cgroup_dirs(tmp_path / "root", str(proc)) == [cpu]


def test_local_ranks_share_the_node(monkeypatch):
    assert detect_budget(affinity=8, dirs=[], local_ranks=2).cpus == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    budget = detect_budget(affinity=8, dirs=[])
    assert budget.cpus == 2 and budget.ranks == 4 and "/ 4 local ranks" in budget.describe()
    assert detect_budget(affinity=2, dirs=[], local_ranks=3).cpus == 1  # never below one CPU


def test_cpus_flag_overrides_and_bad_values_are_refused(tmp_path):
    folder = write(tmp_path / "cg", cpu_max="400000 100000\n")
    budget = detect_budget(cpus=3, affinity=8, dirs=[folder], local_ranks=1)
    assert budget.cpus == 3 and budget.limits == {"affinity": 8, "cgroup quota": 4.0, "--cpus": 3.0}
    assert detect_budget(cpus="16", affinity=8, dirs=[], local_ranks=1).cpus == 8  # cannot raise the others
    for bad in ("0", "-2", "lots", "inf", "nan"):
        with pytest.raises(CpuBudgetError, match="--cpus must be a positive number"):
            detect_budget(cpus=bad, affinity=8, dirs=[], local_ranks=1)


def test_bad_cpus_flag_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mocostream.ops.cli", "train", "--data", str(tmp_path), "--cpus", "-1"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["mocostream: error: --cpus must be a positive number of CPUs"]


def test_thread_split_from_the_budget():
    two = CpuBudget(cpus=2, limits={"affinity": 2}, ranks=1)
    s = split_threads(two, on_gpu=False)
    assert (s.intra_op, s.interop, s.loader) == (2, 1, 2)
    s = split_threads(two, on_gpu=False, intra_op=1, loader=0)  # each pool overridable alone
    assert (s.intra_op, s.loader) == (1, 0)
    s = split_threads(CpuBudget(cpus=16, limits={}, ranks=1), on_gpu=True)
    assert (s.intra_op, s.loader) == (2, 14)  # on a GPU the CPUs feed the loader
    s = split_threads(CpuBudget(cpus=1, limits={}, ranks=1), on_gpu=True)
    assert (s.intra_op, s.loader) == (1, 1)


def test_shard_tool_defaults_from_the_budget():
    assert shard_tool_defaults(CpuBudget(1, {}, 1)) == (1, 32)
    assert shard_tool_defaults(CpuBudget(2, {}, 1)) == (2, 64)
    assert shard_tool_defaults(CpuBudget(64, {}, 1)) == (64, 256)


def test_start_line_names_the_budget_its_sources_and_the_split(caplog):
    """One line at start says the budget, where each limit came from and the split (the loader's own start line
    says which backend and why: tests/test_backends.py)."""
    import logging

    from mocostream.ops.cpu_threads import log_cpu_budget

    budget = detect_budget(affinity=8, dirs=[], local_ranks=2, cpus=6)
    split = split_threads(budget, on_gpu=False)
    caplog.set_level(logging.INFO, logger="mocostream.cpu")
    log_cpu_budget(budget, split, "opencv")
    assert [r.getMessage() for r in caplog.records] == [
        "CPU budget: 3 per rank (min of affinity 8, --cpus 6 / 2 local ranks) -> 3 intra-op threads, 3 loader "
        f"workers, OpenMP wait {openmp_wait()}"]
    caplog.clear()
    log_cpu_budget(budget, split, "dali")
    assert [r.getMessage() for r in caplog.records] == [
        "CPU budget: 3 per rank (min of affinity 8, --cpus 6 / 2 local ranks) -> 3 intra-op threads, 3 loader "
        f"threads, OpenMP wait {openmp_wait()}"]


def test_eval_workers_default_from_the_budget(monkeypatch):
    """`eval linear --protocol reference` sizes its decode processes like training: the rank's share."""
    from mocostream.ops.cli_eval import budget_workers

    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    alone = budget_workers("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cpus))
    assert budget_workers("cpu") == 1 and 1 <= alone <= cpus


def test_throttling_from_cpu_stat(tmp_path):
    v2 = write(tmp_path / "v2", cpu_stat="usage_usec 100\nnr_periods 50\nnr_throttled 7\nthrottled_usec 2500000\n")
    v1 = write(tmp_path / "v1", cpu_stat="nr_periods 50\nnr_throttled 3\nthrottled_time 1500000000\n")
    assert throttling(v2) == (7, 2.5) and throttling(v1) == (3, 1.5)
    assert throttling(tmp_path / "none") is None and throttling(None) is None


def test_openmp_spins_briefly_unless_chosen():
    code = ("import os; from ops.cpu_budget import short_openmp_spin; short_openmp_spin(); import torch; "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    run = lambda extra: subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,  # noqa: E731
                                       env={**env, **extra}, timeout=120).stdout.strip()
    assert run({}) == "None 10000"
    assert run({"OMP_WAIT_POLICY": "PASSIVE"}) == "PASSIVE None"
    assert run({"GOMP_SPINCOUNT": "300000"}) == "None 300000"


# --- the thread tuner, fed simulated step times --------------------------------------------------------

class Threads:
    """torch.set_num_threads stand-in: remembers the count the tuner set."""

    def __init__(self, n):
        self.current = n

    def __call__(self, n):
        self.current = n


def run(n: int, step_time, steps: int) -> tuple[ThreadTuner, list[int]]:
    threads = Threads(n)
    tuner = ThreadTuner(n, threads)
    used = []
    for i in range(steps):
        used.append(threads.current)
        tuner.step(step_time(threads.current, i))
    return tuner, used


def test_ladder():
    assert ladder(1) == [1] and ladder(2) == [2, 1] and ladder(8) == [8, 4, 2, 1] and ladder(6) == [6, 3, 1]


def test_tuner_drops_threads_when_a_neighbour_takes_a_cpu():
    tuner, used = run(2, lambda n, i: {2: 1.0, 1: 0.45}[n], 200)  # beside a busy process: 1 thread wins
    assert tuner.threads == 1 and tuner.switches == 1
    assert used[-150:].count(1) > 140  # it stays there, probing 2 now and then


def test_tuner_keeps_all_threads_alone_and_probes_rarely():
    tuner, used = run(2, lambda n, i: {2: 0.3, 1: 0.45}[n], 2000)
    assert tuner.threads == 2 and tuner.switches == 0
    assert used.count(1) / len(used) < 0.02  # the probes' cost alone, after backing off


def test_tuner_keeps_its_threads_through_one_slow_window():
    """One window slowed by something passing (here the first measured one, steps 9-17, twice as slow) makes
    the first probe of 1 thread win; the probe's rerun against a fresh window loses, so nothing switches."""
    fluke = lambda n, i: {2: 0.3, 1: 0.45}[n] * (2 if 9 <= i < 18 else 1)  # noqa: E731
    tuner, used = run(2, fluke, 400)
    assert tuner.threads == 2 and tuner.switches == 0
    assert used.count(1) / len(used) < 0.05  # the probe, its rerun and one routine probe later


def test_tuner_returns_to_all_threads_when_the_neighbour_leaves():
    busy = lambda n, i: {2: 1.0, 1: 0.45}[n] if i < 300 else {2: 0.3, 1: 0.45}[n]  # noqa: E731
    tuner, used = run(2, busy, 1500)
    assert tuner.threads == 2 and tuner.switches == 2
    assert used[290] == 1 and used[-100:].count(2) > 90


def test_tuner_walks_down_a_longer_ladder():
    tuner, _ = run(8, lambda n, i: {8: 2.0, 4: 1.0, 2: 0.6, 1: 0.9}[n], 400)
    assert tuner.threads == 2


# --- metrics on a real endpoint ----------------------------------------------------------------------

def test_cpu_metrics_on_a_real_endpoint(tmp_path):
    from mocostream.ops.cpu_metrics import CpuCollector
    from mocostream.ops.metrics import TrainMetrics

    metrics = TrainMetrics(3)
    cgroup = write(tmp_path / "cg", cpu_stat="nr_periods 90\nnr_throttled 12\nthrottled_usec 4500000\n")
    for collector in list(metrics.registry._collector_to_names):
        if isinstance(collector, CpuCollector):
            collector.cgroup = cgroup
    metrics.record_cpu(4, {"intra_op": 4, "interop": 1, "loader": 3})
    port = metrics.serve(0, "127.0.0.1")
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    finally:
        metrics.stop()
    text = body.decode()
    for line in ('mocostream_cpu_budget_cpus{rank="3"} 4.0', 'mocostream_threads{pool="intra_op",rank="3"} 4.0',
                 'mocostream_threads{pool="interop",rank="3"} 1.0', 'mocostream_threads{pool="loader",rank="3"} 3.0',
                 'mocostream_cpu_throttled_periods_total{rank="3"} 12.0',
                 'mocostream_cpu_throttled_seconds_total{rank="3"} 4.5'):
        assert line in text, line
    assert 'mocostream_cpu_run_delay_seconds_total{rank="3"}' in text
    used = float(text.split('mocostream_cpu_used_seconds_total{rank="3"} ')[1].split()[0])
    assert used > 0
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'; .ci/run installs it)")
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_run_delay_stays_monotonic_when_threads_exit(tmp_path):
    from mocostream.ops.cpu_metrics import RunDelay

    tasks = tmp_path / "task"
    write(tasks / "1", schedstat="10 2000000000 5\n")
    write(tasks / "2", schedstat="10 1000000000 5\n")
    delay = RunDelay(tasks)
    assert delay.seconds() == 3.0
    shutil.rmtree(tasks / "2")
    write(tasks / "1", schedstat="10 2500000000 5\n")
    assert delay.seconds() == 3.5


def test_manifests_give_the_cpus_the_defaults_are_sized_for():
    import yaml

    docs = list(yaml.safe_load_all((REPO / "ops/k8s/train-pytorchjob.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    res, ranks = pod["resources"], int(job["spec"]["nprocPerNode"])
    assert res["limits"]["cpu"] == res["requests"]["cpu"], "a CPU limit the budget reads, equal to the request"
    budget = detect_budget(affinity=128, dirs=[], cpus=res["limits"]["cpu"], local_ranks=ranks)
    assert split_threads(budget, on_gpu=True) == ThreadSplit(intra_op=1, interop=1, loader=7)
    assert "OMP_NUM_THREADS" not in {e["name"] for e in pod.get("env", [])}, "the budget sizes compute threads"
    shards = next(d for d in yaml.safe_load_all((REPO / "ops/k8s/shards-indexed-job.yaml").read_text())
                  if d["kind"] == "Job" and "--workers" not in str(d))
    res = shards["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["cpu"] == res["requests"]["cpu"]
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    for name in ("shards", "trainer", "trainer-cpu"):
        assert str(compose[name]["cpus"]).startswith("${"), f"{name}: a CPU limit"
