"""DALI index files (`.idx`) for webdataset tars, in the exact format DALI's `wds2idx` writes.

Format "v1.2" (nvidia-dali's wds2idx.py, IndexCreator.create_index):

    v1.2 <number of samples>\\n
    <ext> <data offset> <size> <member name>[ <ext> <data offset> <size> <member name> ...]\\n   (one line per sample)

`data offset` is the byte offset of the member's DATA (header offset + 512) in the tar;
components of a sample are consecutive regular-file members sharing the basename up to
the first dot after the last "/". Hidden members (basename starting with ".") are skipped.
We compute it with `tarfile` from the finished tar instead of shelling out to GNU tar.
"""
from __future__ import annotations

import tarfile

INDEX_VERSION = "v1.2"


def split_name(name: str) -> tuple[str, str]:
    # Same rule as wds2idx.IndexCreator.split_name (and webdataset): split at the first dot of the basename.
    dot = name.find(".", name.rfind("/") + 1)
    return (name[:dot], name[dot + 1:]) if dot >= 0 else (name, "")


def index_lines(tar_path: str) -> list[str]:
    bundles: list[list[tuple[str, int, int, str]]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tf:
        for m in tf:
            if m.type != tarfile.REGTYPE and m.type != tarfile.AREGTYPE:
                continue
            base, ext = split_name(m.name)
            if not base or base.endswith("/"):
                continue
            if base != last:
                bundles.append([])
                last = base
            bundles[-1].append((ext, m.offset_data, m.size, m.name))
    if not bundles:
        raise ValueError(f"webdataset tar is empty: {tar_path}")
    return [" ".join(" ".join(map(str, c)) for c in b) for b in bundles]


def write_index(tar_path: str, idx_path: str, lines: list[str] | None = None) -> int:
    """Write the `.idx` for `tar_path` (from `lines` when the writer already knows them); returns
    the number of samples indexed."""
    lines = index_lines(tar_path) if lines is None else lines
    with open(idx_path, "w", encoding="utf-8", newline="\n") as f:
        f.write(f"{INDEX_VERSION} {len(lines)}\n")
        for line in lines:
            f.write(line + "\n")
    return len(lines)
