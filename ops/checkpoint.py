"""Checkpoints on a local folder or object storage, never half-written under their final name.

Local: write `name.tmp`, fsync, rename (atomic on POSIX). S3: a PUT is atomic: the object appears
only when the upload completes. `latest` is found by listing `checkpoint-<step>.pt` names.
"""
from __future__ import annotations

import io
import os
import re

import torch

from pipeline.sources import filesystem

NAME = re.compile(r"checkpoint-(\d{8})\.pt$")


def _name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


def save(directory: str, step: int, state: dict, keep: int = 2) -> str:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    fs, root = filesystem(directory)
    fs.makedirs(root, exist_ok=True)
    final = root.rstrip("/") + "/" + _name(step)
    if "://" not in directory or directory.startswith("file://"):
        tmp = final + ".tmp"
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    else:
        fs.pipe_file(final, buffer.getvalue())
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        fs.rm(old)
    return final


def list_checkpoints(directory: str) -> list[str]:
    fs, root = filesystem(directory)
    if not fs.exists(root):
        return []
    fs.invalidate_cache(root)
    paths = [p for p in fs.ls(root, detail=False) if NAME.search(p)]
    return sorted(paths, key=lambda p: int(NAME.search(p).group(1)))


def latest(directory: str) -> str | None:
    paths = list_checkpoints(directory)
    return paths[-1] if paths else None


def load(path: str, directory: str) -> dict:
    fs, _ = filesystem(directory)
    with fs.open(path, "rb") as f:
        # Plain tensors and containers only: nothing in a checkpoint is executed.
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
