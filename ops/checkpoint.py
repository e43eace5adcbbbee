"""Checkpoints on a local folder or object storage, never half-written under their final name.

Local: write `name.tmp`, fsync, rename (atomic on POSIX); a failed write removes its `.tmp`. S3: a PUT is
atomic: the object appears only when the upload completes. `latest` is found by listing
`checkpoint-<step>.pt` names. Retention only ever removes checkpoints older than the one just written.
Every call takes the run's `storage` (pipeline.filesystems): its timeouts and retries apply to each remote call.
"""
from __future__ import annotations

import io
import logging
import os
import re
import shutil

import torch

from mocostream.pipeline.filesystems import Storage, StorageUnavailable

log = logging.getLogger("mocostream.checkpoint")

NAME = re.compile(r"checkpoint-(\d{8})\.pt$")
# What a checkpoint must hold to be resumed from; anything less is treated as damaged.
REQUIRED_KEYS = ("step", "model", "optimizer", "loader", "rng", "world")


class CheckpointError(RuntimeError):
    """The checkpoint folder cannot be used; reported in one line."""

    user_error = True


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


def step_of(path: str) -> int:
    return int(NAME.search(path).group(1))


def _is_local(directory: str) -> bool:
    return "://" not in directory or directory.startswith("file://")


def _write_local(final: str, data: bytes) -> None:
    tmp = final + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as e:
        try:  # a full disk must not also keep the partial file
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise CheckpointError(f"cannot write checkpoint {final}: {e.strerror or e}") from None


def _remote(storage: Storage, directory: str, what: str, call):
    """A call on the checkpoint folder's storage: retried as the storage says when it is remote."""
    return call() if _is_local(directory) else storage.retrying(what, call)


def save(directory: str, step: int, state: dict, keep: int = 2, *, storage: Storage) -> str:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    fs, root = storage.filesystem(directory)
    final = root.rstrip("/") + "/" + _name(step)
    if _is_local(directory):
        os.makedirs(root, exist_ok=True)
        _write_local(final, buffer.getvalue())
    else:
        where = f"{directory.rstrip('/')}/{_name(step)}"
        try:
            storage.retrying(f"write checkpoint {where}", lambda: fs.pipe_file(final, buffer.getvalue()))
        except StorageUnavailable as e:
            raise CheckpointError(str(e)) from None
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoint {where}: {e}") from None
    # Only checkpoints older than this one are pruned: a folder holding a longer earlier run never loses
    # the checkpoint just written (and the fresh-run check refuses such a folder anyway).
    older = [p for p in list_checkpoints(directory, storage=storage) if step_of(p) < step]
    for old in older[:len(older) - (keep - 1)] if keep > 0 else []:
        _remote(storage, directory, f"remove old checkpoint {old}", lambda old=old: fs.rm(old))
    return final


def list_checkpoints(directory: str, *, storage: Storage) -> list[str]:
    fs, root = storage.filesystem(directory)

    def listing() -> list[str]:
        if not fs.exists(root):
            return []
        fs.invalidate_cache(root)
        return [p for p in fs.ls(root, detail=False) if NAME.search(p)]

    return sorted(_remote(storage, directory, f"list checkpoints in {directory}", listing), key=step_of)


def latest(directory: str, *, storage: Storage) -> str | None:
    paths = list_checkpoints(directory, storage=storage)
    return paths[-1] if paths else None


def load(path: str, directory: str, *, storage: Storage) -> dict:
    fs, _ = storage.filesystem(directory)
    data = _remote(storage, directory, f"read checkpoint {path}", lambda: fs.cat_file(path))
    # Plain tensors and containers only: nothing in a checkpoint is executed.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_latest_intact(directory: str, *, storage: Storage) -> tuple[str, dict] | tuple[None, None]:
    """The newest checkpoint that loads and holds a full training state. A damaged newer one (truncated,
    empty, garbage, refused pickle) is reported loudly and the previous one used, so a restarting job
    does not crash-loop on it. No checkpoint at all: (None, None); only damaged ones: CheckpointError.
    Storage that does not answer is not damage: StorageUnavailable."""
    paths = list_checkpoints(directory, storage=storage)
    damaged = []
    for path in reversed(paths):
        try:
            state = load(path, directory, storage=storage)
            missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
            if missing:
                raise ValueError(f"no {missing[0]!r} in it")
        except StorageUnavailable:
            raise
        except Exception as e:  # whatever torch.load raises on damaged bytes
            log.error("checkpoint %s is damaged (%s): falling back to the previous one", path, first_line(e))
            damaged.append(path)
            continue
        return path, state
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {directory}: {len(damaged)} damaged "
                              f"({', '.join(os.path.basename(p) for p in damaged[:3])})")
    return None, None


def check_writable(directory: str, need_bytes: int, *, storage: Storage) -> None:
    """Fail at start, not after --checkpoint-every steps: the folder must take a write (read-only file
    systems, permissions, S3 credentials) and, locally, have room for about `need_bytes`."""
    fs, root = storage.filesystem(directory)
    probe = root.rstrip("/") + f"/.write-probe-{os.getpid()}"
    try:
        if _is_local(directory):
            os.makedirs(root, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"probe")
                os.fsync(f.fileno())
            os.remove(probe)
            free = shutil.disk_usage(root).free
            if free < need_bytes:
                raise CheckpointError(f"checkpoint folder {directory} has {free / 1e6:.1f} MB free; a checkpoint "
                                      f"needs about {need_bytes / 1e6:.1f} MB")
        else:
            storage.retrying(f"write {directory.rstrip('/')}/{probe.rsplit('/', 1)[-1]}",
                             lambda: fs.pipe_file(probe, b"probe"))
            storage.retrying(f"remove {probe}", lambda: fs.rm(probe))
    except CheckpointError:
        raise
    except Exception as e:
        try:
            if _is_local(directory) and os.path.exists(probe):
                os.remove(probe)
        except OSError:
            pass
        raise CheckpointError(f"checkpoint folder {directory} is not writable: "
                              f"{getattr(e, 'strerror', None) or first_line(e)}") from None
