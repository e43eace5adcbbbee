"""Input tables streamed row by row, one `--part i/N` slice at a time, in memory that does not grow with
the table: web-scale URL lists (LAION, DataComp, CC12M, YFCC) have 10^8-10^9 rows.

Formats (each optionally compressed: .gz, .bz2, .xz, .zst where its codec is installed):
  .txt / .lst / .urls   one path or URL per line (`#` comments and blank lines skipped)
  .csv / .tsv           a header line, then one row per line (fields must not hold line breaks)
  .jsonl                one JSON object per line
  .parquet              any columns; read one record batch at a time

Slicing: an uncompressed text file is cut into N byte ranges at line boundaries (part i seeks to its
range and reads nothing before it); a parquet table into N row ranges (part i reads only the row groups
that overlap its range). A compressed text file cannot be seeked: every part decompresses it and keeps
every N-th line (memory stays flat; the reading is repeated).

Each row comes with a stable id: its byte offset in the (uncompressed) text, or its row number in a
parquet table. Keys are derived from it, so they do not depend on --part.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Iterator

from fsspec.utils import infer_compression

from mocostream.pipeline.filesystems import Storage

from .errors import ShardError

PLAIN = (".txt", ".lst", ".urls")
TEXT = PLAIN + (".csv", ".tsv", ".jsonl")
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
# Column names tried when --url-col / --caption-col are not given (LAION: URL/TEXT, DataComp: url/text).
URL_NAMES = ("url", "URL", "image_url", "path")
CAPTION_NAMES = ("caption", "TEXT", "text", "Caption")
HEAD_ROWS = 1000  # rows read from a table's start to type its extra fields (the same rows for every part)


def table_kind(src: str) -> str | None:
    """`plain`, `csv`, `tsv`, `jsonl`, `parquet`, or None when `src` is not a table."""
    base = src.rstrip("/").lower()
    for suffix in COMPRESSED:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    if base.endswith(PLAIN):
        return "plain"
    for kind in ("csv", "tsv", "jsonl", "parquet"):
        if base.endswith("." + kind):
            return kind
    return None


@dataclass(frozen=True)
class Columns:
    """Which columns hold the URL and the caption, and which others travel along (None = all)."""
    url: str | None = None
    caption: str | None = None
    extra: tuple[str, ...] | None = None

    def resolve(self, names: list[str], src: str) -> tuple[str, str | None, list[str]]:
        url = self.url or next((c for c in URL_NAMES if c in names), None)
        if url is None or url not in names:
            raise ShardError(f"{src}: no URL column ({self.url or ' / '.join(URL_NAMES)}) among {names[:20]}; "
                             "name it with --url-col")
        caption = self.caption or next((c for c in CAPTION_NAMES if c in names), None)
        if self.caption and self.caption not in names:
            raise ShardError(f"{src}: no column {self.caption!r} (--caption-col) among {names[:20]}")
        if self.extra is not None:
            missing = [c for c in self.extra if c not in names]
            if missing:
                raise ShardError(f"{src}: no column(s) {', '.join(missing)} (--extra-cols) among {names[:20]}")
            extra = [c for c in self.extra if c not in (url, caption)]
        else:
            extra = [c for c in names if c not in (url, caption)]
        return url, caption, extra


def _open_binary(src: str):
    try:
        return Storage().open(src, "rb", compression=infer_compression(src))  # the default storage settings
    except FileNotFoundError:
        raise ShardError(f"source not found: {src}") from None
    except Exception as exc:  # unknown codec, bad credentials, ...
        raise ShardError(f"cannot read source {src}: {type(exc).__name__}: {exc}") from exc


def _lines(src: str, part: tuple[int, int]) -> Iterator[tuple[int, bytes]]:
    """(offset, raw line) of the lines of this part's slice (see the module doc)."""
    i, n = part
    with _open_binary(src) as f:
        if infer_compression(src):
            offset = 0
            for k, raw in enumerate(f):
                if k % n == i:
                    yield offset, raw
                offset += len(raw)
            return
        f.seek(0, os.SEEK_END)
        size = f.tell()
        start, end = i * size // n, (i + 1) * size // n
        f.seek(max(start - 1, 0))
        if start > 0:
            f.readline()  # the rest of a line that began before our range belongs to the previous part
        pos = f.tell()
        while pos < end:
            raw = f.readline()
            if not raw:
                return
            yield pos, raw
            pos += len(raw)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").rstrip("\r\n")


def _header(src: str, sep: str) -> list[str]:
    with _open_binary(src) as f:
        first = _text(f.readline())
    return next(csv.reader([first], delimiter=sep), [])


def _value(v):
    return None if v == "" else v


def _rows_plain(src, part, cols) -> Iterator[tuple[int, dict]]:
    for offset, raw in _lines(src, part):
        line = _text(raw).strip()
        if line and not line.startswith("#"):
            yield offset, {"url": line}


def _rows_delimited(src, part, cols, sep) -> Iterator[tuple[int, dict]]:
    names = _header(src, sep)
    url, caption, extra = cols.resolve(names, src)
    index = {c: names.index(c) for c in [url] + ([caption] if caption else []) + extra}
    for offset, raw in _lines(src, part):
        if offset == 0:
            continue  # the header
        line = _text(raw)
        if not line.strip():
            continue
        fields = next(csv.reader([line], delimiter=sep), [])
        get = (lambda c: _value(fields[index[c]]) if index[c] < len(fields) else None)
        row = {"url": get(url) or ""}
        if caption:
            row["caption"] = get(caption)
        row.update((c, get(c)) for c in extra)
        yield offset, row


def _rows_jsonl(src, part, cols) -> Iterator[tuple[int, dict]]:
    for offset, raw in _lines(src, part):
        line = _text(raw).strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            raise ShardError(f"{src} at byte {offset}: expected a JSON object with a URL field")
        url, caption, extra = cols.resolve(list(obj), src)
        row = {"url": obj.get(url)}
        if not isinstance(row["url"], str):
            raise ShardError(f"{src} at byte {offset}: the URL field {url!r} is not a string")
        if caption:
            row["caption"] = obj.get(caption)
        row.update((c, obj.get(c)) for c in extra)
        yield offset, row


def parquet_file(src: str):
    import pyarrow.parquet as pq

    f = _open_binary(src)
    try:
        return pq.ParquetFile(f)
    except Exception as exc:
        f.close()
        raise ShardError(f"cannot read parquet table {src}: {exc}") from exc


def _rows_parquet(src, part, cols) -> Iterator[tuple[int, dict]]:
    """Rows of a URL/path table. (Tables of image bytes are read by shards.discover.)"""
    pf = parquet_file(src)
    url, caption, extra = cols.resolve(pf.schema_arrow.names, src)
    wanted = [url] + ([caption] if caption else []) + extra
    renamed = ["url"] + (["caption"] if caption else []) + extra
    for row, rg, lo, hi in row_ranges(pf, part):
        for batch in pf.iter_batches(batch_size=65536, row_groups=[rg], columns=wanted):
            n = batch.num_rows
            if row + n <= lo:
                row += n
                continue
            values = [batch.column(c).to_pylist() for c in wanted]
            for j in range(max(lo - row, 0), min(hi - row, n)):
                yield row + j, {name: v[j] for name, v in zip(renamed, values)}
            row += n
            if row >= hi:
                break
    pf.close()


def row_ranges(pf, part: tuple[int, int]) -> Iterator[tuple[int, int, int, int]]:
    """(first row of the group, row group, lo, hi): the row groups overlapping this part's row range
    [lo, hi) (absolute row numbers)."""
    i, n = part
    total = pf.metadata.num_rows
    lo, hi = i * total // n, (i + 1) * total // n
    row = 0
    for rg in range(pf.num_row_groups):
        count = pf.metadata.row_group(rg).num_rows
        if row < hi and row + count > lo:
            yield row, rg, lo, hi
        row += count


def rows(src: str, part: tuple[int, int], cols: Columns = Columns()) -> Iterator[tuple[int, dict]]:
    """(row id, {"url", ["caption"], extra columns...}) of this part's slice of a table."""
    kind = table_kind(src)
    if kind == "plain":
        return _rows_plain(src, part, cols)
    if kind in ("csv", "tsv"):
        return _rows_delimited(src, part, cols, "," if kind == "csv" else "\t")
    if kind == "jsonl":
        return _rows_jsonl(src, part, cols)
    return _rows_parquet(src, part, cols)


def check_columns(src: str, cols: Columns, part: tuple[int, int] = (0, 1)) -> None:
    """Raise ShardError now (not mid-run) when the table lacks the columns asked for."""
    kind = table_kind(src)
    if kind in ("csv", "tsv"):
        cols.resolve(_header(src, "," if kind == "csv" else "\t"), src)
    elif kind == "parquet":
        cols.resolve(parquet_file(src).schema_arrow.names, src)
    elif kind == "jsonl":
        head = rows(src, part, cols)  # this part's first row: a part reads nothing before its slice
        next(head, None)
        head.close()


def head_types(src: str, cols: Columns) -> dict[str, object]:
    """Arrow types of the extra fields, from the table's schema (parquet) or its first HEAD_ROWS rows
    (jsonl; csv fields are strings). The same for every part: read from the start of the table."""
    import pyarrow as pa

    kind = table_kind(src)
    if kind == "parquet":
        schema = parquet_file(src).schema_arrow
        _, caption, extra = cols.resolve(schema.names, src)
        out = {"caption": schema.field(caption).type} if caption else {}
        out.update((c, schema.field(c).type) for c in extra)
        return out
    values: dict[str, list] = {}
    head = rows(src, (0, 1), cols)
    for _, (_, row) in zip(range(HEAD_ROWS), head):
        for k, v in row.items():
            if k != "url":
                values.setdefault(k, []).append(v)
    head.close()
    out = {}
    for k, vals in values.items():
        try:
            typ = pa.array(vals).type if kind == "jsonl" else pa.string()
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            typ = pa.string()
        out[k] = pa.string() if pa.types.is_null(typ) else typ
    return out


def identity(src: str) -> str:
    """What changes when the table's content does: size and modification time (or ETag)."""
    try:
        storage = Storage()  # the default storage settings
        fs, path = storage.filesystem(src)
        info = storage.retrying(f"read {src}", lambda: fs.info(path))
    except FileNotFoundError:
        raise ShardError(f"source not found: {src}") from None
    except Exception as exc:
        raise ShardError(f"cannot read source {src}: {type(exc).__name__}: {exc}") from exc
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("created") or ""
    return f"{src}\0{info.get('size')}\0{stamp}"
