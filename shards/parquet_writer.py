"""Write one parquet shard: an `image` binary column plus metadata columns, row groups of 256."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from .manifest import file_digest

ROW_GROUP_SIZE = 256  # a few hundred rows: small enough to stream, big enough to amortise footers

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("image", pa.binary()),
    ("ext", pa.string()),
    ("label", pa.string()),
    ("source", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
])


def extra_schema(values: dict[str, list]) -> list[tuple[str, pa.DataType]]:
    """Arrow types for extra input fields (caption, url, ...): inferred from all their values;
    fields whose values do not share one type are stored as strings."""
    fields = []
    for name, vals in values.items():
        try:
            typ = pa.array(vals).type
            if pa.types.is_null(typ):
                typ = pa.string()
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            typ = pa.string()
        fields.append((name, typ))
    return fields


class ParquetShardWriter:
    suffix = "parquet"

    def __init__(self, path: str, extra_fields: list[tuple[str, pa.DataType]] | None = None):
        self.path = path
        self.samples = 0
        self.bytes = 0
        self.schema = pa.schema(list(SCHEMA) + [pa.field(n, t) for n, t in (extra_fields or [])])
        self._extra = [n for n, _ in (extra_fields or [])]
        self._string = {n for n, t in (extra_fields or []) if pa.types.is_string(t)}
        self._rows: dict[str, list] = {n: [] for n in self.schema.names}
        self._writer = pq.ParquetWriter(
            path, self.schema,
            # Images are already compressed: snappy would only burn CPU on them; min/max
            # statistics of image blobs would bloat the footer and help no query.
            compression={**{n: "snappy" for n in self.schema.names}, "image": "none"},
            use_dictionary=["ext", "label"],
            write_statistics=[n for n in self.schema.names if n != "image"],
        )

    def cost(self, key: str, source: str, record) -> int:
        return record.size + len(key) + len(source) + 64

    def add(self, key: str, source: str, label: str, record, extra: dict | None = None) -> None:
        """Append a sample (a shards.record.Record)."""
        for name, value in (("key", key), ("image", record.data), ("ext", record.ext), ("label", label),
                            ("source", source), ("width", record.width), ("height", record.height)):
            self._rows[name].append(value)
        for name in self._extra:
            value = (extra or {}).get(name)
            if value is not None and name in self._string and not isinstance(value, str):
                value = str(value)
            self._rows[name].append(value)
        self.bytes += self.cost(key, source, record)
        self.samples += 1
        if len(self._rows["key"]) >= ROW_GROUP_SIZE:
            self._flush()

    def _flush(self) -> None:
        if self._rows["key"]:
            table = pa.Table.from_pydict(self._rows, schema=self.schema)
            self._writer.write_table(table, row_group_size=ROW_GROUP_SIZE)
            self._rows = {n: [] for n in self.schema.names}

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def digest(self) -> tuple[int, str]:
        """(bytes, sha256 hex) of the closed shard (pyarrow writes it: read back once)."""
        return file_digest(self.path)

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:
            pass
