"""What a change that only reshapes the code must leave alone, as digests: shard bytes, batch keys, weights
after a few steps, and resume points, for both augmentation backends.

    python bench/fingerprint.py --out /tmp/after.json
    git worktree add /tmp/before <commit>
    python bench/fingerprint.py --checkout /tmp/before --module ops.cli --out /tmp/before.json
    python bench/fingerprint.py --compare /tmp/before.json /tmp/after.json

`--checkout` runs another checkout's code with this venv's dependencies (its folders first on PYTHONPATH);
`--module` is its command-line module (`ops.cli` before the code was installed under `mocostream.`). The runs
use one compute thread, so the weights' digest is reproducible, and the same 60 Imagenette photos.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "imagenette-mini.tar.gz"
TRAIN = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--queue-size", "64", "--workers", "0",
         "--log-every", "1", "--no-progress", "--metrics-port", "0", "--intra-op-threads", "1",
         "--no-adapt-threads", "--precision", "fp32", "--seed", "3"]
BACKENDS = {"dali": "dali", "opencv": "torch"}  # the OpenCV backend's first name, which newer code keeps as an alias


def extract(dest: Path, per_class: int = 6) -> Path:
    seen: dict[str, int] = {}
    with tarfile.open(DATA) as tf:
        for m in tf:
            parts = m.name.split("/")
            if m.isfile() and "train" in parts and seen.get(parts[-2], 0) < per_class:
                seen[parts[-2]] = seen.get(parts[-2], 0) + 1
                out = dest / parts[-2] / parts[-1]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tf.extractfile(m).read())
    return dest


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def files_digest(folder: Path, patterns: tuple[str, ...]) -> dict[str, str]:
    return {p.name: sha(p.read_bytes()) for pat in patterns for p in sorted(folder.glob(pat))}


class Runner:
    def __init__(self, checkout: Path, module: str):
        self.env = {**os.environ, "PYTHONPATH": f"{checkout}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.module, self.cwd = module, checkout

    def __call__(self, *args: str) -> None:
        r = subprocess.run([sys.executable, "-m", self.module, *args], cwd=self.cwd, env=self.env,
                           capture_output=True, text=True, timeout=1200)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(args[:3])} failed:\n{r.stderr[-3000:]}")


def checkpoint_digest(path: Path) -> dict[str, str]:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    weights = b"".join(t.numpy().tobytes() for t in state["model"].values() if hasattr(t, "numpy"))
    resume = {k: v for k, v in state.items() if k in ("step", "loader", "world")}
    return {"weights": sha(weights), "resume_point": sha(repr(resume).encode())}


def train_digests(run: Runner, shards: Path, work: Path, backend: str) -> dict:
    ckpt, trace = work / f"ckpt-{backend}", work / f"trace-{backend}"
    common = ["train", "--data", str(shards), *TRAIN, "--backend", BACKENDS[backend], "--checkpoint-dir", str(ckpt)]
    run(*common, "--steps", "6", "--checkpoint-every", "3", "--trace-keys", str(trace))
    out = {"keys_6_steps": sha(Path(f"{trace}.rank0").read_bytes())}
    out.update({f"step3_{k}": v for k, v in checkpoint_digest(ckpt / "checkpoint-00000003.pt").items()})
    out.update({f"step6_{k}": v for k, v in checkpoint_digest(ckpt / "checkpoint-00000006.pt").items()})
    (ckpt / "checkpoint-00000006.pt").unlink()  # resume from step 3, as a preempted run would
    run(*common, "--steps", "6", "--resume", "--trace-keys", str(trace) + "-resumed")
    out["keys_resumed_from_3"] = sha(Path(f"{trace}-resumed.rank0").read_bytes())
    return out


def fingerprint(checkout: Path, module: str, work: Path) -> dict:
    """In a fixed folder: shards record their source paths, checkpoints their data's location."""
    run = Runner(checkout, module)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    images = extract(work / "images")
    result = {}
    for fmt in ("tar", "parquet"):
        out = work / f"shards-{fmt}"
        run("shards", "create", str(images), "--out", str(out), "--format", fmt, "--samples-per-shard", "16",
            "--workers", "1", "--quiet")
        result[f"shards_{fmt}"] = files_digest(out, ("shard-*.tar", "shard-*.idx", "shard-*.parquet"))  # not the timings
    for backend in BACKENDS:
        result[f"train_{backend}"] = train_digests(run, work / "shards-tar", work, backend)
    return result


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def compare(a: dict, b: dict) -> int:
    a, b = flat(a), flat(b)
    differ = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    for k in sorted(set(a) | set(b)):
        print(f"{'same   ' if k not in differ else 'DIFFERS'} {k}")
    return 1 if differ else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkout", type=Path, default=REPO)
    p.add_argument("--module", default="mocostream.ops.cli")
    p.add_argument("--out", type=Path)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mocostream-fingerprint"))
    p.add_argument("--compare", nargs=2, type=Path)
    a = p.parse_args()
    if a.compare:
        return compare(*(json.loads(f.read_text()) for f in a.compare))
    result = fingerprint(a.checkout.resolve(), a.module, a.workdir)
    text = json.dumps(result, indent=1, sort_keys=True)
    if a.out:
        a.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
