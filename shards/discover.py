"""Find the inputs, in a deterministic order, each with a stable key and a locator for its bytes.

A source is one of
  - a folder: every regular file under it, walked recursively in sorted order;
  - a tar archive (`.tar`, `.tar.gz`, `.tgz`): every regular member, in archive order;
  - a list (`.txt`, `.lst`, `.urls`): one local path or URL (`s3://`, `http(s)://`, any fsspec URL) per
    line; or `.jsonl`: one object per line with `url` (or `path`) and any extra fields;
  - a parquet table: a binary `image` column (bytes) or a `url` / `path` column, plus extra columns.
Lists and tables may themselves live at an fsspec URL. Extra fields travel into each sample's JSON (tar)
or columns (parquet); a `label` field overrides the default label (the parent folder's name).
"""
from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass, field

import fsspec

from .errors import ShardError
from .keys import assign_keys, natural_key
from .output import storage_options

ARCHIVES = (".tar", ".tar.gz", ".tgz")
LISTS = (".txt", ".lst", ".urls")
URL_COLUMNS = ("url", "path")
IMAGE_COLUMN = "image"
_RESERVED = {"key", "source", "width", "height", "format", "image", "ext"}  # ours, never overridden


@dataclass(frozen=True)
class InputFile:
    path: str     # the input as the user can find it again: a path, URL, `archive.tar#member`, `table#row`
    relpath: str  # what its key is derived from
    label: str    # parent folder's name, or the `label` field ("" when none)
    key: str
    locator: tuple = ()   # how a worker gets the bytes (shards.fetch)
    extra: dict = field(default_factory=dict, compare=False)


def _walk(root: str) -> list[str]:
    rel = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()  # os.walk order is filesystem order; sorting makes it reproducible
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if os.path.isfile(full):  # skips sockets, fifos and dangling links
                rel.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return rel


def _open(url: str, mode: str = "rb"):
    try:
        return fsspec.open(url, mode, **storage_options(url)).open()
    except FileNotFoundError:
        raise ShardError(f"source not found: {url}") from None
    except Exception as exc:
        raise ShardError(f"cannot read source {url}: {type(exc).__name__}: {exc}") from exc


def _clean_extra(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in _RESERVED and v is not None}


def _stem(src: str) -> str:
    base = src.rstrip("/").rsplit("/", 1)[-1]
    for suffix in ARCHIVES + LISTS + (".jsonl", ".parquet"):
        if base.endswith(suffix):
            return natural_key(base[: -len(suffix)] + ".x")
    return natural_key(base)


def _folder(src: str) -> list[tuple[str, str, str, tuple, dict]]:
    return [(os.path.join(src, rel), rel, os.path.basename(os.path.dirname(rel)), ("file", os.path.join(src, rel)), {})
            for rel in _walk(src)]


def _archive(src: str) -> list[tuple]:
    if not os.path.isfile(src):
        raise ShardError(f"source not found: {src}")
    out = []
    try:
        with tarfile.open(src, "r:*") as tf:
            compressed = not src.endswith(".tar")
            for m in tf:
                if not m.isreg():
                    continue
                name = m.name.lstrip("./")
                loc = ("tarz", src, m.name) if compressed else ("tar", src, m.offset_data, m.size)
                out.append((f"{src}#{name}", name, os.path.basename(os.path.dirname(name)), loc, {}))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ShardError(f"cannot read tar archive {src}: {exc}") from exc
    return out


def _locator(url: str) -> tuple:
    return ("url", url) if "://" in url else ("file", url)


def _list(src: str) -> list[tuple]:
    stem, out = _stem(src), []
    with _open(src, "rt") as f:
        for n, line in enumerate(f):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if src.endswith(".jsonl"):
                try:
                    row = json.loads(line)
                    url = row.get("url") or row.get("path")
                except (json.JSONDecodeError, AttributeError):
                    row, url = {}, None
                if not isinstance(url, str):
                    raise ShardError(f"{src} line {n + 1}: expected a JSON object with a 'url' or 'path'")
                extra = _clean_extra({k: v for k, v in row.items() if k not in URL_COLUMNS})
            else:
                url, extra = line, {}
            out.append((url, f"{stem}/{n:09d}", str(extra.pop("label", "")), _locator(url), extra))
    return out


def _table(src: str) -> list[tuple]:
    import pyarrow.parquet as pq

    stem, out = _stem(src), []
    with _open(src) as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:
            raise ShardError(f"cannot read parquet table {src}: {exc}") from exc
        names = pf.schema_arrow.names
        url_col = next((c for c in URL_COLUMNS if c in names), None)
        if IMAGE_COLUMN not in names and url_col is None:
            raise ShardError(f"parquet table {src} has neither an '{IMAGE_COLUMN}' column nor one of "
                             f"{', '.join(URL_COLUMNS)}")
        extra_cols = [c for c in names if c not in _RESERVED and c not in URL_COLUMNS]
        row = 0
        for rg in range(pf.num_row_groups):
            cols = extra_cols + ([url_col] if url_col and IMAGE_COLUMN not in names else [])
            t = pf.read_row_group(rg, columns=cols).to_pylist() if cols else [{}] * pf.metadata.row_group(rg).num_rows
            for i, values in enumerate(t):
                extra = _clean_extra({c: values.get(c) for c in extra_cols})
                if IMAGE_COLUMN in names:
                    loc, path = ("parquet", src, rg, i), f"{src}#{row}"
                else:
                    path = values.get(url_col) or ""
                    loc = _locator(path)
                out.append((path, f"{stem}/{row:09d}", str(extra.pop("label", "")), loc, extra))
                row += 1
    return out


def _kind(src: str) -> str:
    if src.endswith(ARCHIVES):
        return "archive"
    if src.endswith(LISTS + (".jsonl",)):
        return "list"
    if src.endswith(".parquet"):
        return "table"
    if "://" in src:
        raise ShardError(f"remote sources must be a list (.txt/.jsonl) or a parquet table: {src}")
    if not os.path.exists(src):
        raise ShardError(f"source not found: {src}")
    if not os.path.isdir(src):
        raise ShardError(f"source is not a folder, tar archive, list (.txt/.jsonl) or parquet table: {src}")
    return "folder"


READERS = {"folder": _folder, "archive": _archive, "list": _list, "table": _table}


def discover(sources: list[str]) -> list[InputFile]:
    """Every input of every source, in order (no extension filter: a non-image is a reject, not skipped)."""
    if not sources:
        raise ShardError("no sources given")
    found: list[tuple] = []
    for src in sources:
        found.extend(READERS[_kind(src)](src))
    keys = assign_keys([rel for _, rel, _, _, _ in found])
    return [InputFile(path=path, relpath=rel, label=label, key=key, locator=loc, extra=extra)
            for (path, rel, label, loc, extra), key in zip(found, keys)]
