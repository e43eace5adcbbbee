"""Find the input files: local folders walked recursively, in sorted (deterministic) order."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ShardError
from .keys import assign_keys


@dataclass(frozen=True)
class InputFile:
    path: str     # as the user spelled the source, joined with the relative path
    relpath: str  # relative to its source root, "/"-separated
    label: str    # name of the parent folder ("" for files at the source root)
    key: str


def _walk(root: str) -> list[str]:
    rel = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()  # os.walk order is filesystem order; sorting makes it reproducible
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if os.path.isfile(full):  # skips sockets, fifos and dangling links
                rel.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return rel


def discover(sources: list[str]) -> list[InputFile]:
    """Every regular file under each source (no extension filter: a non-image is a reject, not skipped)."""
    if not sources:
        raise ShardError("no sources given")
    found: list[tuple[str, str]] = []
    for src in sources:
        if "://" in src:
            raise ShardError(f"only local source folders are supported for now: {src}")
        if not os.path.isdir(src):
            raise ShardError(f"source not found: {src}" if not os.path.exists(src)
                             else f"source is not a folder: {src}")
        found.extend((src, rel) for rel in _walk(src))
    keys = assign_keys([rel for _, rel in found])
    return [
        InputFile(path=os.path.join(src, rel), relpath=rel,
                  label=os.path.basename(os.path.dirname(rel)), key=key)
        for (src, rel), key in zip(found, keys)
    ]
