"""Input tables streamed row by row, one `--part i/N` slice at a time, in memory that does not grow with
the table: web-scale URL lists (LAION, DataComp, CC12M, YFCC) have 10^8-10^9 rows.

Formats (each optionally compressed: .gz, .bz2, .xz, .zst where its codec is installed; a UTF-8 BOM is ignored):
  .txt / .lst / .urls   one path or URL per line (`#` comments and blank lines skipped)
  .csv / .tsv           a header record, then one row per record, parsed by the csv module: a quoted field
                        may hold line breaks (a caption)
  .jsonl                one JSON object per line
  .parquet              any columns; read one record batch at a time

Slicing: an uncompressed text file is cut into N byte ranges; a line (CSV/TSV: a record) belongs to the part
whose range holds its first byte. A line list or .jsonl part seeks to its range and reads nothing before
it. A CSV/TSV part cannot tell from one line whether it starts inside a quoted field: it parses a little
before its range both ways until the two readings meet at a record start (see _record_boundary), so it
finds exactly the records a parse from the top would. A parquet table is cut into N row ranges (part i reads only
the row groups that overlap its range). A compressed text file cannot be seeked: every part decompresses it
and keeps every N-th line (CSV/TSV: record); memory stays flat, the reading is repeated.

Each row comes with a stable id: its byte offset in the (uncompressed) text, or its row number in a
parquet table. Keys are derived from it, so they do not depend on --part.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
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
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark some tools write first: not part of the first line's text
SCAN_CHUNK = 1 << 16  # a CSV part starts parsing this far before its range (more if needed)


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


def _open_binary(src: str, storage: Storage):
    try:
        return storage.open(src, "rb", compression=infer_compression(src))
    except FileNotFoundError:
        raise ShardError(f"source not found: {src}") from None
    except Exception as exc:  # unknown codec, bad credentials, ...
        raise ShardError(f"cannot read source {src}: {type(exc).__name__}: {exc}") from exc


def _byte_range(f, part: tuple[int, int]) -> tuple[int, int]:
    """[start, end): this part's byte range of a seekable file."""
    i, n = part
    f.seek(0, os.SEEK_END)
    size = f.tell()
    return i * size // n, (i + 1) * size // n


def _lines(src: str, part: tuple[int, int], storage: Storage) -> Iterator[tuple[int, bytes]]:
    """(offset, raw line) of the lines of this part's slice (see the module doc); a UTF-8 BOM is dropped."""
    i, n = part
    with _open_binary(src, storage) as f:
        if infer_compression(src):
            offset = 0
            for k, raw in enumerate(f):
                if k % n == i:
                    yield offset, raw.removeprefix(BOM) if offset == 0 else raw
                offset += len(raw)
            return
        start, end = _byte_range(f, part)
        f.seek(max(start - 1, 0))
        if start > 0:
            f.readline()  # the rest of a line that began before our range belongs to the previous part
        pos = f.tell()
        while pos < end:
            raw = f.readline()
            if not raw:
                return
            yield pos, raw.removeprefix(BOM) if pos == 0 else raw
            pos += len(raw)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").rstrip("\r\n")


class _Tracked:
    """The lines of a binary file as text for csv.reader, counting the bytes it consumed (`pos`): csv.reader
    reads exactly the lines of one record per row, so `pos` before a row is that row's offset. `lead` is put
    before the first line (a quote: "this line starts inside a quoted field")."""

    def __init__(self, f, pos: int, lead: str = ""):
        self.f, self.pos, self.lead = f, pos, lead

    def __iter__(self):
        return self

    def __next__(self) -> str:
        raw = self.f.readline()
        if not raw:
            raise StopIteration
        first, lead, self.lead = self.pos == 0, self.lead, ""
        self.pos += len(raw)
        return lead + (raw.removeprefix(BOM) if first else raw).decode("utf-8", "surrogateescape")


def _starts(f, at: int, quoted: bool, start: int, sep: str) -> list[int] | None:
    """Record starts after line start `at`, up to the first at or past `start`, parsing as if `at` began a
    record (or, `quoted`, lay inside a quoted field); None when that reading is not CSV."""
    f.seek(at)
    lines = _Tracked(f, at, '"' if quoted else "")
    reader, found = csv.reader(lines, delimiter=sep), [] if quoted else [at]
    try:
        while found[-1:] == [] or found[-1] < start:
            next(reader)
            found.append(lines.pos)
    except StopIteration:
        pass
    except csv.Error:
        return None
    return found


def _record_boundary(f, start: int, sep: str) -> int:
    """A record start at or before `start`, as parsing from the top would find it, read from near `start`.

    A line starts either a record or the rest of a quoted field (csv's only states after a line break). From a
    line start L a little before `start`, both readings are parsed: once they share a record start, they
    agree from there on, whichever was true, so that record start is a true one. Without one before `start`
    (or when the record-start reading is not CSV), L moves back, down to the top of the file."""
    window = SCAN_CHUNK
    while start - window > 0:
        f.seek(start - window - 1)
        f.readline()  # to the next line start
        at = f.tell()
        if at <= start:
            plain, quoted = _starts(f, at, False, start, sep), _starts(f, at, True, start, sep)
            if plain is not None and quoted is None:
                return at  # the quoted reading fails, so `at` starts a record (or the file is not CSV at all)
            if plain is not None:
                common = sorted(set(plain) & set(quoted))
                if common:
                    return common[0]
        window *= 8
    return 0
def _records(src: str, part: tuple[int, int], sep: str, storage: Storage) -> Iterator[tuple[int, list[str]]]:
    """(offset, fields) of this part's CSV/TSV records, the header included when it is in the part. Quoted
    fields may hold line breaks: a record belongs to the part whose byte range holds its first byte
    (compressed: every N-th record)."""
    i, n = part
    with _open_binary(src, storage) as f:
        compressed = bool(infer_compression(src))
        start, end = (0, None) if compressed else _byte_range(f, part)
        lines = _Tracked(f, 0 if compressed else _record_boundary(f, start, sep))
        if not compressed:
            f.seek(lines.pos)
        reader = csv.reader(lines, delimiter=sep)
        k = -1
        while True:
            at = lines.pos
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise ShardError(f"{src}: bad {'CSV' if sep == ',' else 'TSV'} record at byte {at}: {exc} "
                                 "(an unclosed quote?)") from None
            k += 1
            if end is not None and at >= end:
                return
            if (k % n == i if compressed else at >= start) and fields and (len(fields) > 1 or fields[0].strip()):
                yield at, fields


def _header(src: str, sep: str, storage: Storage) -> list[str]:
    with contextlib.closing(_records(src, (0, 1), sep, storage)) as records:
        at, fields = next(records, (None, []))
    return fields if at == 0 else []


def _value(v):
    return None if v == "" else v


def _rows_plain(src, part, cols, storage) -> Iterator[tuple[int, dict]]:
    for offset, raw in _lines(src, part, storage):
        line = raw.decode("utf-8", "surrogateescape").strip()  # a path keeps its bytes, UTF-8 or not
        if line and not line.startswith("#"):
            yield offset, {"url": line}


def _rows_delimited(src, part, cols, sep, storage) -> Iterator[tuple[int, dict]]:
    names = _header(src, sep, storage)
    url, caption, extra = cols.resolve(names, src)
    index = {c: names.index(c) for c in [url] + ([caption] if caption else []) + extra}
    for offset, fields in _records(src, part, sep, storage):
        if offset == 0:
            continue  # the header

        def get(c):
            return _value(fields[index[c]]) if index[c] < len(fields) else None

        row = {"url": get(url) or ""}  # a path keeps its raw bytes (surrogate escapes); text is made valid
        if caption:
            row["caption"] = _valid(get(caption))
        row.update((c, _valid(get(c))) for c in extra)
        yield offset, row


def _valid(v):
    return v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if isinstance(v, str) else v


def _rows_jsonl(src, part, cols, storage) -> Iterator[tuple[int, dict]]:
    for offset, raw in _lines(src, part, storage):
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
        if row["url"] is not None and not isinstance(row["url"], str):  # null: a row without URL, a reject
            raise ShardError(f"{src} at byte {offset}: the URL field {url!r} is not a string")
        if caption:
            row["caption"] = obj.get(caption)
        row.update((c, obj.get(c)) for c in extra)
        yield offset, row


def parquet_file(src: str, storage: Storage):
    import pyarrow.parquet as pq

    f = _open_binary(src, storage)
    try:
        return pq.ParquetFile(f)
    except Exception as exc:
        f.close()
        raise ShardError(f"cannot read parquet table {src}: {exc}") from exc


def _rows_parquet(src, part, cols, storage) -> Iterator[tuple[int, dict]]:
    """Rows of a URL/path table. (Tables of image bytes are read by shards.discover.)"""
    pf = parquet_file(src, storage)
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


def rows(src: str, part: tuple[int, int], cols: Columns, storage: Storage) -> Iterator[tuple[int, dict]]:
    """(row id, {"url", ["caption"], extra columns...}) of this part's slice of a table, read through `storage`."""
    kind = table_kind(src)
    if kind == "plain":
        return _rows_plain(src, part, cols, storage)
    if kind in ("csv", "tsv"):
        return _rows_delimited(src, part, cols, "," if kind == "csv" else "\t", storage)
    if kind == "jsonl":
        return _rows_jsonl(src, part, cols, storage)
    return _rows_parquet(src, part, cols, storage)


def check_columns(src: str, cols: Columns, part: tuple[int, int], storage: Storage) -> None:
    """Raise ShardError now (not mid-run) when the table lacks the columns asked for."""
    kind = table_kind(src)
    if kind in ("csv", "tsv"):
        cols.resolve(_header(src, "," if kind == "csv" else "\t", storage), src)
    elif kind == "parquet":
        cols.resolve(parquet_file(src, storage).schema_arrow.names, src)
    elif kind == "jsonl":
        head = rows(src, part, cols, storage)  # this part's first row: a part reads nothing before its slice
        next(head, None)
        head.close()


def head_types(src: str, cols: Columns, storage: Storage) -> dict[str, object]:
    """Arrow types of the extra fields, from the table's schema (parquet) or its first HEAD_ROWS rows
    (jsonl; csv fields are strings). The same for every part: read from the start of the table."""
    import pyarrow as pa

    kind = table_kind(src)
    if kind == "parquet":
        schema = parquet_file(src, storage).schema_arrow
        _, caption, extra = cols.resolve(schema.names, src)
        out = {"caption": schema.field(caption).type} if caption else {}
        out.update((c, schema.field(c).type) for c in extra)
        return out
    values: dict[str, list] = {}
    head = rows(src, (0, 1), cols, storage)
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


def identity(src: str, storage: Storage) -> str:
    """What changes when the table's content does: size and modification time (or ETag)."""
    try:
        fs, path = storage.filesystem(src)
        info = storage.retrying(f"read {src}", lambda: fs.info(path))
    except FileNotFoundError:
        raise ShardError(f"source not found: {src}") from None
    except Exception as exc:
        raise ShardError(f"cannot read source {src}: {type(exc).__name__}: {exc}") from exc
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("created") or ""
    return f"{src}\0{info.get('size')}\0{stamp}"


CONTENT_SAMPLE = 1 << 20  # bytes read from each end of a file for its content id


def content_id(src: str, storage: Storage) -> str:
    """What a file holds, the same on every host (no modification time): its size and a sha256 of its first
    and last MiB. `shards merge` compares it across parts: a part made from another list of the same name
    differs here."""
    try:
        with storage.open(src, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(0)
            h = hashlib.sha256(f.read(CONTENT_SAMPLE))
            if size > CONTENT_SAMPLE:
                f.seek(max(size - CONTENT_SAMPLE, CONTENT_SAMPLE))
                h.update(f.read())
    except FileNotFoundError:
        raise ShardError(f"source not found: {src}") from None
    except Exception as exc:
        raise ShardError(f"cannot read source {src}: {type(exc).__name__}: {exc}") from exc
    return f"{size}:{h.hexdigest()[:32]}"
