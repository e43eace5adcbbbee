"""Write one parquet shard: an `image` binary column plus metadata columns, row groups of 256."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from .validate import Sample

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
_META_COLUMNS = [n for n in SCHEMA.names if n != "image"]


class ParquetShardWriter:
    suffix = "parquet"

    def __init__(self, path: str):
        self.path = path
        self.samples = 0
        self._rows: dict[str, list] = {n: [] for n in SCHEMA.names}
        self._writer = pq.ParquetWriter(
            path, SCHEMA,
            # Images are already compressed: snappy would only burn CPU on them; min/max
            # statistics of image blobs would bloat the footer and help no query.
            compression={**{n: "snappy" for n in _META_COLUMNS}, "image": "none"},
            use_dictionary=["ext", "label"],
            write_statistics=_META_COLUMNS,
        )

    def add(self, key: str, source: str, label: str, sample: Sample) -> None:
        for name, value in (("key", key), ("image", sample.data), ("ext", sample.ext), ("label", label),
                            ("source", source), ("width", sample.width), ("height", sample.height)):
            self._rows[name].append(value)
        self.samples += 1
        if len(self._rows["key"]) >= ROW_GROUP_SIZE:
            self._flush()

    def _flush(self) -> None:
        if self._rows["key"]:
            table = pa.Table.from_pydict(self._rows, schema=SCHEMA)
            self._writer.write_table(table, row_group_size=ROW_GROUP_SIZE)
            self._rows = {n: [] for n in SCHEMA.names}

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:
            pass
