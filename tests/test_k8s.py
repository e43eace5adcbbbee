"""The Kubernetes manifests of ops/k8s: core objects against the Kubernetes JSON schemas
(kubernetes-validate), the PyTorchJob and PodMonitor (CRDs, no schema shipped) by structure, and every
command line in them parsed by the real parsers (torchrun's and mocostream's)."""
from __future__ import annotations

import re
import shlex

import pytest
import yaml

from helpers import REPO
from mocostream.ops.cli import build_parser
from mocostream.ops.config import build_config, read_config_file

K8S = REPO / "ops" / "k8s"
CRDS = {("kubeflow.org/v1", "PyTorchJob"), ("monitoring.coreos.com/v1", "PodMonitor")}


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def one(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def validate_core(obj: dict) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    # strict: a misspelt or misplaced field is an error, not silently dropped by the API server.
    kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def mocostream_args(argv: list[str]):
    """Parse a mocostream command line with the real parser (argparse exits on an unknown flag)."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"mocostream rejects: {argv}")


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_core_objects_pass_kubernetes_validate():
    core = [d for _, d in documents() if (d["apiVersion"], d["kind"]) not in CRDS]
    assert {d["kind"] for d in core} >= {"Job", "Secret", "ConfigMap"}
    for doc in core:  # a kind without a schema raises SchemaNotFoundError: a CRD must be listed in CRDS
        validate_core(doc)


def test_shards_indexed_job_runs_n_parts_then_merges():
    job = one("Job", "mocostream-shards")["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"]
    container = job["template"]["spec"]["containers"][0]
    assert container["command"] == ["sh", "-c"]
    line = shlex.split(container["args"][0])
    assert line[0] == "exec" and line[1] == "mocostream"
    part = flag(line, "--part")
    assert part == f"${{JOB_COMPLETION_INDEX}}/{job['completions']}", "N in --part i/N must be the completions"
    args = mocostream_args([w.replace("${JOB_COMPLETION_INDEX}", "3") for w in line[2:]])
    assert args.command == "shards" and args.part == f"3/{job['completions']}"
    merge = one("Job", "mocostream-shards-merge")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert merge[0] == "mocostream" and mocostream_args(merge[1:]).command == "shards"
    assert flag(line, "--out") == merge[3], "the merge Job must join the create Job's DEST"


def pytorchjob() -> tuple[dict, dict, dict]:
    job = one("PyTorchJob")
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    pod = worker["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "pytorch")
    return job, pod, container


def test_pytorchjob_is_an_elastic_kubeflow_job():
    job, pod, container = pytorchjob()
    assert job["apiVersion"] == "kubeflow.org/v1"
    spec = job["spec"]
    # Field names of the training-operator v1 API: a typo would be pruned silently by the CRD.
    assert set(spec) <= {"pytorchReplicaSpecs", "elasticPolicy", "runPolicy", "nprocPerNode"}
    elastic = spec["elasticPolicy"]
    assert set(elastic) <= {"minReplicas", "maxReplicas", "rdzvBackend", "rdzvPort", "rdzvHost", "rdzvId",
                            "rdzvConf", "standalone", "maxRestarts", "metrics"}
    assert elastic["rdzvBackend"] == "c10d" and elastic["maxRestarts"] >= 1
    assert set(spec["pytorchReplicaSpecs"]) == {"Worker"}, "elastic jobs have Workers only (no Master)"
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert set(worker) <= {"replicas", "restartPolicy", "template"}
    assert worker["restartPolicy"] in ("OnFailure", "Always", "ExitCode", "Never")
    assert 1 <= elastic["minReplicas"] <= worker["replicas"] <= elastic["maxReplicas"]
    assert set(spec.get("runPolicy", {})) <= {"cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds",
                                               "backoffLimit", "schedulingPolicy", "suspend", "managedBy"}
    # The pod template itself is core Kubernetes: validate it against the schema.
    validate_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "worker"},
                   "template": worker["template"]})


def test_pytorchjob_command_gpus_ports_and_config_agree(tmp_path):
    from torch.distributed.run import get_args_parser

    job, pod, container = pytorchjob()
    assert container["command"] == ["torchrun"]
    launcher = get_args_parser().parse_args(container["args"])  # real torchrun flags or SystemExit
    assert launcher.module and launcher.training_script == "mocostream.ops.cli"
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == "1", "restarted groups need a fresh store"
    nproc = int(launcher.nproc_per_node)
    assert str(nproc) == job["spec"]["nprocPerNode"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == nproc, "one rank per GPU"
    train_argv = launcher.training_script_args
    args = mocostream_args(train_argv)
    assert args.command == "train"

    # The ConfigMap holds a config file the trainer accepts (unknown keys and bad values are errors).
    config_path = flag(train_argv, "--config")
    mount = next(m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = one("ConfigMap", volume["configMap"]["name"])
    filename = config_path.rsplit("/", 1)[1]
    (tmp_path / filename).write_text(configmap["data"][filename])
    cfg = build_config(read_config_file(str(tmp_path / filename)), {})
    assert cfg.resume and cfg.checkpoint_dir.startswith("s3://"), "pods are ephemeral: resume from shared storage"
    assert cfg.data.startswith("s3://") and not cfg.progress

    # Rank r serves metrics on metrics_port + local rank: one named container port per rank.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert sorted(ports.values()) == [cfg.metrics_port + r for r in range(nproc)]
    monitor = one("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    pod_labels = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), pod_labels
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert sorted(e["port"] for e in endpoints) == sorted(ports), "a PodMonitor endpoint per rank port"
    assert all(e.get("path", "/metrics") == "/metrics" for e in endpoints)


def test_pytorchjob_pod_shm_secret_user_and_grace_period(tmp_path):
    from mocostream.moco_core import MoCo, build_encoder
    from torch.distributed.run import get_args_parser

    job, pod, container = pytorchjob()
    shm = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    volume = next(v for v in pod["volumes"] if v["name"] == shm["name"])
    assert volume["emptyDir"]["medium"] == "Memory", "/dev/shm must be memory-backed"

    # S3 credentials come from the Secret that ops/k8s defines (an example) and the shards Jobs use too.
    secret = one("Secret")
    refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
    assert refs == [secret["metadata"]["name"]]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    for _, doc in documents():
        if doc["kind"] == "Job":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                assert [e["secretRef"]["name"] for e in c["envFrom"]] == refs
    assert not any("AWS_SECRET" in e.get("name", "") and "value" in e for e in container.get("env", []))

    dockerfile_user = re.search(r"^USER (\d+)", (REPO / "Dockerfile").read_text(), re.M).group(1)
    assert pod["securityContext"]["runAsNonRoot"] and str(pod["securityContext"]["runAsUser"]) == dockerfile_user

    # SIGTERM -> torchrun forwards it -> ranks checkpoint -> torchrun SIGKILLs after --shutdown-timeout;
    # the kubelet's own SIGKILL must come later. Budget: the checkpoint this job writes (model, key encoder,
    # SGD momentum, queue) at a slow 20 MB/s to object storage, plus a minute for the step in flight.
    shutdown = int(get_args_parser().parse_args(container["args"]).shutdown_timeout)
    assert pod["terminationGracePeriodSeconds"] > shutdown
    config = one("ConfigMap")["data"]["train.yaml"]
    (tmp_path / "train.yaml").write_text(config)
    cfg = build_config(read_config_file(str(tmp_path / "train.yaml")), {})
    model = MoCo(build_encoder(cfg.arch), dim=cfg.dim, K=cfg.queue_size, mlp=cfg.mlp)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    momentum_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    checkpoint_seconds = (state_bytes + momentum_bytes) / 20e6
    assert shutdown >= checkpoint_seconds + 60, (shutdown, checkpoint_seconds)
