"""Learning curves for bench/learn_cifar.py: kNN top-1 of snapshots taken during a run, against images seen and
against minutes of training, written as JSON and a PNG plot.

Snapshots are scored after training, never inside it, so the runs' speed is not touched by the evaluation:
ours are training checkpoints (one every few steps; for each mark of the curve the first at or after it is
kept), the peer's are its backbone at each mark. Every point is the same weighted kNN as `mocostream eval knn`
(k 200, T 0.1, 32-px images) on a fixed subset: the first `per_class` images per class of train/ as the bank
and of test/ as the queries, so a point costs seconds.
"""
from __future__ import annotations

import json
from pathlib import Path


def checkpoint_times(folder: Path) -> list[dict]:
    """(path, step, train_seconds) of each training checkpoint in `folder`, by step."""
    import torch

    out = []
    for path in sorted(folder.glob("checkpoint-*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        out.append({"path": str(path), "step": int(state["step"]), "train_seconds": float(state["train_seconds"])})
    return sorted(out, key=lambda c: c["step"])


def at_marks(points: list[dict], every_seconds: float) -> list[dict]:
    """For each multiple of `every_seconds`, the first point at or after it; and the last point."""
    chosen, mark = [], every_seconds
    for point in points:
        if point["train_seconds"] >= mark:
            chosen.append(point)
            while mark <= point["train_seconds"]:
                mark += every_seconds
    if points and (not chosen or chosen[-1] is not points[-1]):
        chosen.append(points[-1])
    return chosen


def score(data: Path, checkpoint: str | None, arch: str, per_class: int) -> float:
    """kNN top-1 of a checkpoint (None: the randomly initialised `arch`, the runs' seed) on the fixed subset."""
    from mocostream.ops.evaluate import evaluate

    return evaluate("knn", str(data), checkpoint, arch, image_size=32, max_per_class=per_class)["top1"]


def curve(data: Path, points: list[dict], arch: str, batch_size: int, per_class: int) -> list[dict]:
    """Scored points {step, images, minutes, top1}; a point without a path is the random initialisation."""
    return [{"step": p["step"], "images": p["step"] * batch_size, "minutes": p["train_seconds"] / 60,
             "top1": score(data, p.get("path"), arch, per_class)} for p in points]


def write_curves(curves: dict[str, list[dict]], meta: dict, json_path: Path, png_path: Path) -> None:
    """`curves`: label -> points; JSON with `meta`, and a PNG: top-1 against images seen, and against minutes."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    json_path.write_text(json.dumps({**meta, "curves": curves}, indent=1))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for label, points in curves.items():
        top1 = [100 * p["top1"] for p in points]
        axes[0].plot([p["images"] for p in points], top1, marker="o", label=label)
        axes[1].plot([p["minutes"] for p in points], top1, marker="o", label=label)
    axes[0].set_xlabel("images seen")
    axes[1].set_xlabel("minutes of training")
    axes[0].set_ylabel(f"kNN top-1 (%), {meta.get('subset', 'subset')}")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(loc="best", fontsize="small")
    fig.suptitle(meta.get("title", "kNN top-1 during training"), fontsize="medium")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
