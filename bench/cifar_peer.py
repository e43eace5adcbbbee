"""The peer of bench/learn_cifar.py: lightly's CIFAR-10 MoCo example (bench/peer_lightly_moco.py), run from its
own venv, pinned to its own CPUs, its backbone scored by the same `mocostream eval knn` as ours.

    python bench/cifar_peer.py --install      # makes the peer's venv (also done by learn_cifar.py --peer lightly)

The venv holds lightly (pinned) and what it needs beyond ours; torch and torchvision are ours, reached through a
.pth line to the folder holding them (not reinstalled): both sides run the same kernels, and the venv costs
seconds, not a 5 GB download. Nothing of mocostream is importable there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

LIGHTLY = "lightly==1.6.0"  # the latest 1.6 release
DEFAULT_VENV = Path("/tmp/mocostream-bench-peer/venv-lightly")
SCRIPT = Path(__file__).resolve().with_name("peer_lightly_moco.py")


def ensure_lightly(venv: Path) -> Path:
    """The peer venv's python, made on first use; checks lightly's version and that torch is ours."""
    import torch
    import torchvision

    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = next((venv / "lib").glob("python*/site-packages"))
        shared = dict.fromkeys(str(Path(m.__file__).resolve().parents[1]) for m in (torch, torchvision))
        (site / "shared-torch.pth").write_text("".join(f"{d}\n" for d in shared))
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", LIGHTLY],
                       check=True)
    probe = subprocess.run([str(python), "-c", "import json, lightly, torch; print(json.dumps("
                            "[lightly.__version__, torch.__version__]))"], capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit(f"the peer venv {venv} does not import lightly (remove it to rebuild):\n{probe.stderr[-2000:]}")
    version, peer_torch = json.loads(probe.stdout)
    if f"lightly=={version}" != LIGHTLY or peer_torch != torch.__version__:
        sys.exit(f"the peer venv {venv} has lightly {version} and torch {peer_torch} (want {LIGHTLY} and torch "
                 f"{torch.__version__}): remove it to rebuild")
    return python


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (the machine changes between sessions)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def pinned(cmd: list[str], cpus: str | None) -> list[str]:
    """`cmd` under `taskset -c cpus` (its threads and worker processes inherit the mask)."""
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def start_peer(python: Path, train_dir: Path, out: Path, budget_minutes: float, snapshot_minutes: float,
               batch_size: int, workers: int, width: float, cpus: str | None) -> subprocess.Popen:
    """The peer's run, started; its log goes to out/peer.log (a file: two runs at once never block on a pipe)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(python), str(SCRIPT), "--data", str(train_dir), "--out", str(out), "--budget-minutes",
           str(budget_minutes), "--snapshot-minutes", str(snapshot_minutes), "--batch-size", str(batch_size),
           "--workers", str(workers), "--width", str(width)]
    with open(out / "peer.log", "w") as log:
        return subprocess.Popen(pinned(cmd, cpus), stdout=log, stderr=subprocess.STDOUT, cwd=out,
                                env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


def finish_peer(proc: subprocess.Popen, out: Path, timeout: float) -> dict:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.returncode != 0:
        sys.exit(f"the peer failed ({proc.returncode}):\n{(out / 'peer.log').read_text()[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def as_checkpoint(snapshot: Path, dest: Path, arch: str) -> Path:
    """A peer snapshot as a training checkpoint `mocostream eval knn` reads: its backbone as our `arch`'s query
    encoder. The load is strict, so a name or shape that differs from ours fails the evaluation; `fc` (the
    projection head, which kNN drops) is a fresh one of ours."""
    import torch

    from mocostream.moco_core import build_encoder

    state = torch.load(snapshot, map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    head = {k: v for k, v in build_encoder(arch)(num_classes=128).state_dict().items() if k.startswith("fc.")}
    model = {f"encoder_q.{k}": v for k, v in {**state["backbone"], **head}.items()}
    torch.save({"model": model, "step": state["step"], "config": {"arch": arch, "dim": 128, "mlp": False},
                "train_seconds": state["train_seconds"]}, dest)
    return dest


def backbone_parameters(arch: str) -> int:
    from mocostream.moco_core import backbone_of, build_encoder

    return sum(p.numel() for p in backbone_of(build_encoder(arch)(num_classes=128)).parameters())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--install", action="store_true", help="make the peer venv (if missing) and check it")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    args = p.parse_args()
    if not args.install:
        p.error("nothing to do: give --install")
    print(ensure_lightly(args.venv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
