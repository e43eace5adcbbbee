"""The shard list as columns: what a rank holds of a billion-image dataset.

A million shards as Python objects cost hundreds of MB per rank; as columns (names, sample counts, sizes,
digests) they cost about 80 bytes a shard, and a `Shard` is made only for a shard a rank actually reads.
The columnar manifest (`manifest.parquet`, written beside `manifest.json` by `mocostream shards create`)
is read straight into these columns: no JSON parse, only the four columns the loader needs.
"""
from __future__ import annotations

import hashlib
import json
import logging

import numpy as np

from .filesystems import Storage
from .sources import DataSpecError, Shard, check_shard_columns, shard_format

log = logging.getLogger(__name__)

META_KEY = b"mocostream_manifest"  # parquet key-value metadata: {"json_bytes": size of the JSON it mirrors}


class ShardTable:
    """Shards as columns. `names`: relative to `base` or full URLs (a list or a pyarrow string array);
    `sizes` -1 = unknown; `digests`: an (n, 32) uint8 array of sha256 digests, all zero = unknown;
    `validated_by`: the manifest's validation stamp (pipeline.image_check.trusted), None = unvalidated.
    A curated selection's table (selection.load_table) also has `kept`: the samples of each shard it keeps."""

    def __init__(self, base: str, names, counts, sizes=None, digests=None, validated_by: dict | None = None):
        self.base, self.names, self.validated_by = base, names, validated_by
        self.counts = np.asarray(counts, dtype=np.int64)
        self.sizes = np.full(len(self.counts), -1, np.int64) if sizes is None else np.asarray(sizes, np.int64)
        self.digests = digests
        self.kept = None  # a curated selection's KeptMembers (selection.py): which samples of each shard are read
        self._fingerprints: dict[int, str] = {}

    @classmethod
    def from_shards(cls, shards: list[Shard]) -> "ShardTable":
        if any(s.samples is None for s in shards):
            raise ValueError("shard sample counts must be known (see sources.with_counts)")
        digests = None
        if any(s.sha256 for s in shards):
            digests = np.zeros((len(shards), 32), np.uint8)
            for i, s in enumerate(shards):
                if s.sha256:
                    digests[i] = np.frombuffer(bytes.fromhex(s.sha256), np.uint8)
        stamp = shards[0].validated_by if shards else None
        same = all(s.validated_by is stamp or s.validated_by == stamp for s in shards)
        return cls("", [s.url for s in shards], [s.samples for s in shards],
                   [-1 if s.bytes is None else s.bytes for s in shards], digests, stamp if same else None)

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, i: int) -> Shard:
        name = self.names[i]
        name = name if isinstance(name, str) else name.as_py()
        url = name if not self.base or "://" in name or name.startswith("/") else self.base.rstrip("/") + "/" + name
        digest = bytes(self.digests[i]) if self.digests is not None and self.digests[i].any() else None
        size = int(self.sizes[i])
        return Shard(url, int(self.counts[i]), shard_format(name), None if size < 0 else size,
                     digest.hex() if digest else None)

    def fingerprint(self, n: int | None = None) -> str:
        """Identifies the first n shards: their names (last path part only: the data may move), sample
        counts and digests, in order. A list that only grew keeps the fingerprint of its old part."""
        n = len(self) if n is None else n
        if n not in self._fingerprints:
            self._fingerprints[n] = self._fingerprint(n)
        return self._fingerprints[n]

    def _fingerprint(self, n: int) -> str:
        h = hashlib.blake2b(str(n).encode(), digest_size=16)
        _hash_basenames(h, self.names[:n])
        h.update(self.counts[:n].tobytes())
        if self.digests is not None:
            h.update(self.digests[:n].tobytes())
        return h.hexdigest()


def _hash_basenames(h, names) -> None:
    """Feed the names' last path parts to `h`, vectorised and independent of how the column is chunked."""
    import pyarrow as pa
    import pyarrow.compute as pc

    chunks = names.chunks if isinstance(names, pa.ChunkedArray) else [names]
    lengths_h, data_h = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
    for arr in chunks:
        arr = arr.cast(pa.string()) if isinstance(arr, pa.Array) else pa.array(arr, pa.string())
        if not len(arr):
            continue
        if pc.any(pc.match_substring(arr, "/")).as_py():  # names in folders (merged sets, URLs)
            arr = pc.replace_substring_regex(arr, pattern=r"^.*/", replacement="")
        offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset : arr.offset + len(arr) + 1]
        lengths_h.update(np.diff(offsets).astype(np.int64).tobytes())
        data_h.update(memoryview(arr.buffers()[2])[offsets[0] : offsets[-1]])
    h.update(lengths_h.digest() + data_h.digest())


def columnar_name(json_name: str) -> str:
    """manifest.json -> manifest.parquet, manifest-parquet.json -> manifest-parquet.parquet."""
    return json_name[: -len(".json")] + ".parquet"


def read_columnar(url: str, json_url: str | None = None, *, storage: Storage) -> ShardTable | None:
    """The shard table from a columnar manifest; None when it is absent or older than `json_url` (the JSON
    manifest it mirrors: a JSON of another size than recorded was rewritten after it)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            meta = json.loads((pf.schema_arrow.metadata or {}).get(META_KEY, b"{}"))
            if json_url is not None:
                jfs, jpath = storage.filesystem(json_url)
                if meta.get("json_bytes") != jfs.size(jpath):
                    log.warning("%s does not match %s (rewritten since?): reading the JSON manifest", url, json_url)
                    return None
            table = _columns(pf, url, storage.allow_external_shards)
            table.validated_by = meta.get("validated_by")
            return table
    except FileNotFoundError:
        return None
    except DataSpecError:
        raise
    except Exception as e:  # a damaged columnar manifest: the JSON one still works
        if json_url is None:
            raise DataSpecError(f"unreadable columnar manifest {url}: {e}") from None
        log.warning("unreadable columnar manifest %s (%s): reading the JSON manifest", url, e)
        return None


def _columns(pf, url: str, allow_external: bool) -> ShardTable:
    """Column by column, row group by row group, into the table's final form: little more than the table.
    Checked by the same rules as a JSON manifest's entries (sources.check_shard_columns)."""
    import pyarrow as pa

    counts = _numbers(pf, "samples", url)
    sizes = _numbers(pf, "bytes", url)
    digests, row, names = np.zeros((len(counts), 32), np.uint8), 0, []
    for group in range(pf.num_row_groups):  # a row group at a time: no second copy of the column
        for chunk in pf.read_row_group(group, columns=["sha256"]).column(0).chunks:
            raw = np.frombuffer(chunk.buffers()[1], np.uint8)[chunk.offset * 32 : (chunk.offset + len(chunk)) * 32]
            digests[row : row + len(chunk)] = raw.reshape(-1, 32)
            row += len(chunk)
        names += pf.read_row_group(group, columns=["name"]).column(0).chunks
    names = pa.chunked_array(names, pa.string())  # chunked: indexing finds the chunk
    check_shard_columns(names, counts, sizes, url, allow_external)
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    return ShardTable(base, names, counts, sizes, digests)


def _numbers(pf, column: str, url: str):
    """A count column as numpy; a missing value is an error (a count of what, otherwise?)."""
    values = pf.read(columns=[column]).column(0)
    if values.null_count:
        row = values.is_null().to_numpy(zero_copy_only=False).argmax()
        raise DataSpecError(f"manifest {url}, shard entry {row}: '{column}' is missing")
    return values.to_numpy()


def _manifest_json(spec: str, storage: Storage) -> str | None:
    """The JSON manifest a data spec names (a .json, or a folder / prefix holding manifest.json), if any."""
    if spec.endswith(".json"):
        return spec
    if "," in spec or "{" in spec or spec.endswith((".tar", ".parquet")):
        return None
    candidate = spec.rstrip("/") + "/manifest.json"
    fs, path = storage.filesystem(candidate)
    return candidate if fs.exists(path) else None


def load_shard_table(spec: str, share=None, on_missing=None, *, storage: Storage) -> ShardTable:
    """The shards of a data spec as a table. With a columnar manifest each rank reads only its four columns;
    otherwise the list is resolved and counted by one rank: `share(compute)` runs `compute` on one rank and
    hands every rank its result (None: here). `on_missing`: see sources.with_counts (called on that rank)."""
    from .sources import resolve_shards, with_counts

    spec = spec.strip()
    json_url = _manifest_json(spec, storage) if spec else None
    if json_url is not None:
        table = read_columnar(columnar_name(json_url), json_url, storage=storage)
        if table is not None:
            return table

    def compute() -> list[Shard]:
        return with_counts(resolve_shards(spec, storage=storage), storage=storage, on_missing=on_missing)

    return ShardTable.from_shards(share(compute) if share else compute())
