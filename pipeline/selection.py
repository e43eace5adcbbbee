"""A curated selection as training data: `--data DEST` of `mocostream curate` trains on exactly the kept samples
of the data it was made from, reading that data's shards as they are (no shard is rewritten).

DEST/manifest.json of a selection (small; `kind` tells it from a shard set's manifest)::

    {"format_version": 1, "kind": "selection", "created_by": "mocostream curate",
     "data": "<the data spec it selects from>", "data_shards": n, "data_fingerprint": "<ShardTable.fingerprint(n)>",
     "fingerprint": "<selection fingerprint>", "shards_table": "kept/shards.parquet",
     "inputs": N, "total_samples": K}

DEST/kept/shards.parquet: one row per data shard with kept samples, in data order: `shard` (index into the data's
shard list), `name` (the data's name for it, checked), `samples` (kept count), `file` and `offset`: where its kept
member indices lie, as little-endian int32 in DEST/kept/<file> (sorted, each the index of a sample within its
shard in the order the pipeline reads it), starting at element `offset`. One members file holds many shards'
indices, so a million shards do not make a million objects; a rank reads a shard's indices (one ranged read of
a few kB) only when it reads that shard.

The plan sees the kept counts as the shard sizes: it stays O(shards), and exact and elastic resume work as for
any data. The selection's fingerprint is part of the stream's resume state: another selection is refused.
The selection names its data by the spec given to `curate`; that data is loaded and checked exactly as
`--data DATA` would be, and the selection's own rows are indices into it, so it names no file of its own choosing
but its members files (plain names in DEST/kept/).
"""
from __future__ import annotations

import json
import logging
import re

import numpy as np

from .filesystems import Storage, is_remote
from .shard_table import ShardTable, load_shard_table
from .sources import DataSpecError

log = logging.getLogger(__name__)

KIND = "selection"
SHARDS_TABLE = "kept/shards.parquet"
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a members file: a plain name inside DEST/kept/


class KeptMembers:
    """Which samples of each shard of a curated table are read: row i of the table keeps `counts[i]` samples,
    whose member indices lie in `base/files[i]` from element `offsets[i]`."""

    def __init__(self, base: str, files: list[str], offsets: np.ndarray, counts: np.ndarray, data_counts: np.ndarray,
                 fingerprint: str):
        self.base, self.files, self.fingerprint = base.rstrip("/"), files, fingerprint
        self.offsets, self.counts, self.data_counts = offsets, counts, data_counts

    def members(self, i: int, storage: Storage) -> np.ndarray:
        """The sorted member indices kept from row i's shard (one ranged read), checked."""
        url = f"{self.base}/{self.files[i]}"
        start, n = int(self.offsets[i]) * 4, int(self.counts[i])
        fs, path = storage.filesystem(url)

        def read() -> bytes:
            return fs.cat_file(path, start=start, end=start + 4 * n)

        raw = storage.retrying(f"read {url}", read) if is_remote(url) else read()
        members = np.frombuffer(raw, "<i4")
        if len(members) != n or (n and (members[0] < 0 or members[-1] >= self.data_counts[i]
                                        or np.any(np.diff(members) <= 0))):
            raise OSError(f"kept members of row {i} in {url} are damaged (expected {n} increasing indices "
                          f"below {int(self.data_counts[i])})")
        return members

    def select(self, i: int, samples: list, storage: Storage) -> list:
        """The kept samples among row i's shard's samples (all of them, in stored order); a shard that ended
        early gives fewer (the stream counts the rest as missing)."""
        members = self.members(i, storage)
        return [samples[m] for m in members.tolist() if m < len(samples)]


def selection_header(spec: str, storage: Storage) -> tuple[str, dict] | None:
    """(manifest URL, its document) when `spec` names a curated selection (a manifest.json beside
    kept/shards.parquet whose kind is "selection"), else None. One existence check for any other spec."""
    spec = spec.strip()
    if not spec or "," in spec or "{" in spec or spec.endswith((".tar", ".parquet")):
        return None
    url = spec if spec.endswith(".json") else spec.rstrip("/") + "/manifest.json"
    folder = url.rsplit("/", 1)[0] if "/" in url else "."
    fs, path = storage.filesystem(f"{folder}/{SHARDS_TABLE}")
    if not storage.retrying(f"read {folder}", lambda: fs.exists(path)):
        return None
    try:
        doc = json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise DataSpecError(f"selection manifest is not valid JSON: {url} ({e})") from None
    return (url, doc) if isinstance(doc, dict) and doc.get("kind") == KIND else None


def load_table(spec: str, share=None, on_missing=None, *, storage: Storage) -> ShardTable:
    """The shard table of a data spec (see shard_table.load_shard_table); for a curated selection, the data's
    shards that keep samples, with the kept counts as their sizes and `kept` telling which samples."""
    found = selection_header(spec, storage)
    if found is None:
        return load_shard_table(spec, share, on_missing, storage=storage)
    url, doc = found
    for field, kind in (("data", str), ("data_shards", int), ("data_fingerprint", str), ("fingerprint", str)):
        if not isinstance(doc.get(field), kind):
            raise DataSpecError(f"selection manifest {url}: '{field}' is missing or not a {kind.__name__}")
    data = load_shard_table(doc["data"], share, on_missing, storage=storage)
    n = doc["data_shards"]
    if len(data) < n or data.fingerprint(n) != doc["data_fingerprint"]:
        raise DataSpecError(f"the data of selection {url} changed since it was made ({doc['data']}: other shards, "
                            "sample counts or sha256): run `mocostream curate` on it again")
    table = _kept_table(url, data, n, doc["fingerprint"], storage)
    log.info("curated selection %s: %d of %d samples in %d of %d shards of %s", url, int(table.counts.sum()),
             int(data.counts[:n].sum()), len(table), n, doc["data"])
    return table


def _kept_table(url: str, data: ShardTable, n: int, fingerprint: str, storage: Storage) -> ShardTable:
    """The curated ShardTable from DEST/kept/shards.parquet, checked against the data's list (vectorised)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    folder = url.rsplit("/", 1)[0] if "/" in url else "."
    fs, path = storage.filesystem(f"{folder}/{SHARDS_TABLE}")
    try:
        with fs.open(path, "rb") as f:
            t = pq.read_table(f, columns=["shard", "name", "samples", "file", "offset"])
    except Exception as e:
        raise DataSpecError(f"unreadable selection table {folder}/{SHARDS_TABLE}: {e}") from None
    if any(t.column(c).null_count for c in t.column_names):
        raise DataSpecError(f"selection table {folder}/{SHARDS_TABLE} has missing values")
    index = t.column("shard").to_numpy().astype(np.int64)
    samples = t.column("samples").to_numpy().astype(np.int64)
    offsets = t.column("offset").to_numpy().astype(np.int64)
    files = t.column("file").to_pylist()
    bad = (index < 0) | (index >= n) | (samples < 1) | (offsets < 0)
    names = None
    if not bad.any():
        bad |= samples > data.counts[index]
        bad[1:] |= index[1:] <= index[:-1]
        column = data.names if isinstance(data.names, (pa.Array, pa.ChunkedArray)) else pa.array(data.names, pa.string())
        names = pc.take(column, pa.array(index))
        bad |= ~pc.equal(names, t.column("name")).to_numpy(zero_copy_only=False)
        bad |= np.array([not PLAIN_NAME.match(f) for f in files], bool)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataSpecError(f"selection table {folder}/{SHARDS_TABLE}, row {row}: does not fit the data's shard "
                            f"list (shard index, name, kept count or members file)")
    digests = None if data.digests is None else data.digests[index]
    table = ShardTable(data.base, names, samples, data.sizes[index], digests, data.validated_by)
    table.kept = KeptMembers(f"{folder}/kept", files, offsets, samples, data.counts[index], fingerprint)
    return table
