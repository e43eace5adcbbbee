"""Find the inputs, in a deterministic order, each with a stable key and a locator for its bytes.

A source is one of
  - a folder: every regular file under it, walked recursively in sorted order;
  - a tar archive (`.tar`, `.tar.gz`, `.tgz`): every regular member, in archive order;
  - a table of paths/URLs (shards.tables: `.txt`/`.lst`/`.urls`, `.csv`, `.tsv`, `.jsonl`, `.parquet`,
    compressed text too): one input per row, plus its caption and extra columns;
  - a parquet table with a binary `image` column (the bytes themselves).
Tables may live at an fsspec URL. Extra fields travel into each sample's JSON (tar) or columns (parquet);
a `label` field overrides the default label (the parent folder's name).

Tables are streamed: `Inputs` yields one part's rows (`--part i/N`) without holding the list, so memory
does not grow with a 10^9-row table. Folders and archives are small enough to list (their keys need the
whole listing to stay collision-free); `--shuffle` lists everything too (a permutation needs it all).
A table row's key is `<table stem>_<row id>` (byte offset of its line, or parquet row number), so keys do
not depend on --part.
"""
from __future__ import annotations

import hashlib
import os
import random
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

from mocostream.pipeline.filesystems import Storage

from .errors import ShardError
from .keys import assign_keys, natural_key, without_credentials
from .tables import (Columns, check_columns, content_id, head_types, identity, parquet_file, row_ranges, rows,
                     table_kind)
from .validate import UNREADABLE

ARCHIVES = (".tar", ".tar.gz", ".tgz")
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


def _clean_extra(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in _RESERVED and v is not None}


def _stem(src: str) -> str:
    base = src.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        if base.endswith(suffix) and table_kind(base):
            base = base[: -len(suffix)]
    return natural_key(base)


def _folder(src: str) -> list[tuple]:
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


def locator(url: str) -> tuple:
    if url.startswith(("http://", "https://")):
        # bytes that were not UTF-8 in the list (kept as surrogate escapes) go on the wire as they were
        url = "".join(f"%{ord(c) - 0xDC00:02X}" if "\udc80" <= c <= "\udcff" else c for c in url)
        return ("http", url)  # downloaded by the main process's download stage (shards.download)
    return ("url", url) if "://" in url else ("file", url)


def _url_input(src: str, rid: int, url) -> tuple[str, tuple]:
    """(path as stored, locator) of a table row's URL or path; a row without one is its own reject, named
    by the table and row so it can be found."""
    if not isinstance(url, str) or not url.strip():
        return f"{src}#{rid}", ("failed", UNREADABLE, "no URL" if url is None or isinstance(url, str)
                                else f"no URL (the URL column holds {type(url).__name__})")
    return without_credentials(url), locator(url)


def _is_image_table(src: str, storage: Storage) -> bool:
    return table_kind(src) == "parquet" and IMAGE_COLUMN in parquet_file(src, storage).schema_arrow.names


def _kind(src: str, storage: Storage) -> str:
    if src.endswith(ARCHIVES):
        return "archive"
    if table_kind(src):
        return "images" if _is_image_table(src, storage) else "table"
    if "://" in src:
        raise ShardError(f"remote sources must be a table (.txt/.csv/.tsv/.jsonl/.parquet): {src}")
    if not os.path.exists(src):
        raise ShardError(f"source not found: {src}")
    if not os.path.isdir(src):
        raise ShardError(f"source is not a folder, tar archive or table (.txt/.csv/.tsv/.jsonl/.parquet): {src}")
    return "folder"


def _image_rows(src: str, part: tuple[int, int], storage: Storage) -> Iterator[tuple[int, tuple, dict]]:
    """(row, locator, extra fields) of a parquet table holding the image bytes."""
    pf = parquet_file(src, storage)
    extra_cols = [c for c in pf.schema_arrow.names if c not in _RESERVED]
    for first, rg, lo, hi in row_ranges(pf, part):
        t = pf.read_row_group(rg, columns=extra_cols) if extra_cols else None
        values = {c: t.column(c).to_pylist() for c in extra_cols} if t is not None else {}
        for j in range(max(lo - first, 0), min(hi - first, pf.metadata.row_group(rg).num_rows)):
            yield first + j, ("parquet", src, rg, j), {c: v[j] for c, v in values.items()}
    pf.close()


def _slice(n: int, part: tuple[int, int]) -> range:
    i, parts = part
    return range(i * n // parts, (i + 1) * n // parts)


class Inputs:
    """This part's inputs, in processing order; iterate as often as needed (tables are re-read). Remote
    tables are read through `storage` (the run's timeouts and retries)."""

    def __init__(self, sources: list[str], part: tuple[int, int] = (0, 1), columns: Columns = Columns(),
                 shuffle: bool = False, seed: int = 0, *, storage: Storage):
        if not sources:
            raise ShardError("no sources given")
        self.sources, self.part, self.columns, self.shuffle, self.seed = sources, part, columns, shuffle, seed
        self.storage = storage
        self.kinds = [_kind(s, storage) for s in sources]
        listed = [(i, t) for i, s in enumerate(sources) if self.kinds[i] in ("folder", "archive")
                  for t in (_folder(s) if self.kinds[i] == "folder" else _archive(s))]
        keys = assign_keys([t[1] for _, t in listed])
        self._listed: dict[int, list[InputFile]] = {}
        for (i, (path, rel, label, loc, extra)), key in zip(listed, keys):
            self._listed.setdefault(i, []).append(InputFile(path, rel, label, key, loc, extra))
        self._taken = set(keys)
        for i, kind in enumerate(self.kinds):
            if kind == "table":
                check_columns(sources[i], columns, (0, 1) if shuffle else part, storage)
        streamed = [i for i, k in enumerate(self.kinds) if k in ("table", "images")]
        stems = assign_keys([_stem(sources[i]) for i in streamed])
        self._stems = dict(zip(streamed, stems))

    def _table(self, i: int, part: tuple[int, int]) -> Iterator[InputFile]:
        src, stem = self.sources[i], self._stems[i]
        if self.kinds[i] == "images":
            found = ((row, f"{src}#{row}", loc, extra) for row, loc, extra in _image_rows(src, part, self.storage))
            width = 9
        else:
            found = ((rid, *_url_input(src, rid, r.get("url")), r) for rid, r in rows(src, part, self.columns, self.storage))
            width = 9 if table_kind(src) == "parquet" else 12
        for rid, path, loc, row in found:
            extra = _clean_extra({k: v for k, v in row.items() if k != "url"})
            rel = f"{stem}/{rid:0{width}d}"
            key = natural_key(rel)
            while key in self._taken:  # a folder file with the same natural key: rare, still never a clash
                key += "_t"
            yield InputFile(path, rel, str(extra.pop("label", "")), key, loc, extra)

    def _source(self, i: int, part: tuple[int, int]) -> Iterator[InputFile]:
        if i in self._listed or self.kinds[i] in ("folder", "archive"):
            items = self._listed.get(i, [])
            yield from (items[j] for j in _slice(len(items), part))
        else:
            yield from self._table(i, part)

    def __iter__(self) -> Iterator[InputFile]:
        if not self.shuffle:
            for i in range(len(self.sources)):
                yield from self._source(i, self.part)
            return
        # --shuffle permutes ALL inputs (so sources mix across shards), then takes the part's slice.
        every = [it for i in range(len(self.sources)) for it in self._source(i, (0, 1))]
        order = list(range(len(every)))
        random.Random(self.seed).shuffle(order)
        yield from (every[order[j]] for j in _slice(len(order), self.part))

    def identity(self) -> str:
        """sha256 of what the inputs are: listed files one by one, tables by size and modification time."""
        h = hashlib.sha256()
        for i, src in enumerate(self.sources):
            if self.kinds[i] in ("table", "images"):
                h.update(identity(src, self.storage).encode("utf-8", "surrogateescape") + b"\0")
            else:
                for it in self._source(i, (0, 1) if self.shuffle else self.part):
                    h.update(f"{it.path}\0{it.key}".encode("utf-8", "surrogateescape") + b"\0")
        return h.hexdigest()

    def content_ids(self) -> list[str]:
        """Per source, what it holds whatever host reads it: files (tables, archives) by size and the digest
        of both ends, folders by their whole listing. Recorded in the manifest for `shards merge`."""
        out = []
        for i, src in enumerate(self.sources):
            if self.kinds[i] == "folder":
                h = hashlib.sha256()
                for it in self._listed.get(i, []):
                    h.update(it.relpath.encode("utf-8", "surrogateescape") + b"\0")
                out.append(f"{len(self._listed.get(i, []))} files:{h.hexdigest()[:32]}")
            else:
                out.append(content_id(src, self.storage))
        return out

    def listed_extras(self) -> Iterator[dict]:
        for items in self._listed.values():
            yield from (it.extra for it in items)

    def extra_types(self) -> list[tuple[str, object]]:
        """Arrow types of the extra fields for parquet output: listed files' values as they are; tables'
        from their schema or first rows (never the whole table); a field typed two ways is a string."""
        import pyarrow as pa

        from .parquet_writer import extra_schema

        values: dict[str, list] = {}
        for extra in self.listed_extras():
            for k, v in extra.items():
                values.setdefault(k, []).append(v)
        types = dict(extra_schema(values))
        for i, src in enumerate(self.sources):
            if self.kinds[i] == "images":
                schema = parquet_file(src, self.storage).schema_arrow
                found = {c: schema.field(c).type for c in schema.names if c not in _RESERVED}
            elif self.kinds[i] == "table":
                found = head_types(src, self.columns, self.storage)
            else:
                continue
            for k, t in found.items():
                if k in _RESERVED or k == "label":
                    continue
                types[k] = t if types.get(k, t) == t else pa.string()
        return list(types.items())

    def table_sources(self) -> list[str]:
        return [s for s, k in zip(self.sources, self.kinds) if k in ("table", "images")]
