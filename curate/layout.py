"""The curation folder DEST (local or an s3:// prefix): where each stage's files live, their names per data
shard, and writes that never leave a half-written file under a final name.

    DEST/embeddings/<shard-stem>.parquet   key, shard, member, vector (fixed_size_list<float16>[D]), per shard
    DEST/embeddings/_meta.json             what the embeddings were made from (data, backbone, transform)
    DEST/embeddings/_index.parquet         one row per embedded shard (written when every shard is done)
    DEST/clusters/centroids_level{i}.npy   float32, i = 0 (finest) .. L-1 (coarsest)
    DEST/clusters/mean.npy                 float32 [D], the fit sample's mean vector (see cluster.py: centred)
    DEST/clusters/tree.json                {"levels", "rule", "parents", "centre", "fit"}
    DEST/clusters/assign/<shard-stem>.npy  int32 finest cluster of each row of the shard's embeddings
    DEST/selection.parquet, DEST/report.json, DEST/kept/, DEST/manifest.json (select)

A shard's stem is its name without the extension and without the folder all the data's shard names share:
`shard-000012` for `shard-000012.tar` or `s3://bucket/raw/shard-000012.tar`, `part-00001-of-00004/shard-000003`
for a merged set's names (no two shards of a list get one stem).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile

from mocostream.pipeline.filesystems import Storage, is_remote

EMBEDDINGS, CLUSTERS, ASSIGN = "embeddings", "clusters", "clusters/assign"
META, INDEX, DONE = "embeddings/_meta.json", "embeddings/_index.parquet", "_index.parquet"
TREE, MEAN = "clusters/tree.json", "clusters/mean.npy"
SELECTION, REPORT, MANIFEST = "selection.parquet", "report.json", "manifest.json"


class CurateError(ValueError):
    """A bad argument or a DEST that does not fit the command: one line, non-zero exit."""

    user_error = True


class Stems:
    """The stems of a shard table's names, made on demand (a million names stay one arrow column)."""

    def __init__(self, names):
        import pyarrow as pa
        import pyarrow.compute as pc

        self.names = names if isinstance(names, (pa.Array, pa.ChunkedArray)) else pa.array(names, pa.string())
        bounds = pc.min_max(self.names).as_py() if len(self.names) else {"min": "", "max": ""}
        common = os.path.commonprefix([bounds["min"] or "", bounds["max"] or ""])
        self.cut = common.rfind("/") + 1  # the shared folder, up to its last slash
        stems = pc.replace_substring_regex(pc.utf8_slice_codeunits(self.names, self.cut), pattern=r"\.[^./]*$",
                                           replacement="")
        if pc.count_distinct(stems).as_py() != len(self.names):
            raise CurateError("two shards of the data have the same name up to their extension (e.g. x.tar and "
                              "x.parquet): curate one format at a time")

    def __len__(self) -> int:
        return len(self.names)

    def name(self, i: int) -> str:
        return self.names[i].as_py()

    def __getitem__(self, i: int) -> str:
        stem = self.name(i)[self.cut:]
        return stem.rsplit(".", 1)[0]


def shard_urls(names, base: str):
    """The shards' URLs as the stream reads them (pipeline.shard_table): a name relative to the data's folder
    `base` joined to it; full URLs and absolute paths as they are. Arrow column in, arrow column out."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not base:
        return names
    absolute = pc.or_(pc.match_substring(names, "://"), pc.starts_with(names, "/"))
    joined = pc.binary_join_element_wise(pa.scalar(base.rstrip("/")), names, "/")
    return pc.if_else(absolute, names, joined)


class Dest:
    """DEST through one Storage: whole-file reads and atomic writes (local: a temp file renamed into place after
    fsync; remote: one PUT, which appears complete or not at all)."""

    def __init__(self, url: str, storage: Storage):
        self.url, self.storage = url.rstrip("/") or url, storage
        self.fs, self.root = storage.filesystem(self.url)
        self.remote = is_remote(self.url)

    def location(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _call(self, what: str, call):
        return self.storage.retrying(what, call) if self.remote else call()

    def exists(self, name: str) -> bool:
        return bool(self._call(f"list {self.location(name)}", lambda: self.fs.exists(self._path(name))))

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return self._call(f"read {self.location(name)}", lambda: self.fs.cat_file(self._path(name)))
        except FileNotFoundError:
            return None

    def read_json(self, name: str) -> dict | None:
        raw = self.read_bytes(name)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise CurateError(f"{self.location(name)} is not valid JSON ({e}): remove it to redo its stage") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        if self.remote:
            self.storage.write_bytes(self.location(name), data)
            return
        path = self._path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def write_json(self, name: str, doc: dict) -> None:
        self.write_bytes(name, (json.dumps(doc, indent=1) + "\n").encode())

    def write_table(self, name: str, table, **kw) -> None:
        import pyarrow.parquet as pq

        out = io.BytesIO()
        pq.write_table(table, out, **kw)
        self.write_bytes(name, out.getvalue())

    def read_table(self, name: str, columns=None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        raw = self.read_bytes(name)
        if raw is None:
            raise CurateError(f"not found: {self.location(name)}")
        return pq.read_table(pa.BufferReader(raw), columns=columns)

    def put_file(self, local: str, name: str) -> None:
        """A finished local file published under `name` (moved locally, uploaded remotely)."""
        if not self.remote:
            os.makedirs(os.path.dirname(self._path(name)), exist_ok=True)
            shutil.move(local, self._path(name))  # a rename, or a copy from another filesystem (--work-dir)
            return
        self.storage.retrying(f"write {self.location(name)}", lambda: self.fs.put_file(local, self._path(name)))

    def get_file(self, name: str, local: str) -> None:
        """`name` copied to the local path `local` (written under a temporary name, then renamed)."""
        tmp = f"{local}.tmp-{os.getpid()}"
        try:
            self._call(f"read {self.location(name)}", lambda: self.fs.get_file(self._path(name), tmp))
        except FileNotFoundError:
            raise CurateError(f"not found: {self.location(name)}") from None
        os.replace(tmp, local)

    def remove(self, name: str) -> None:
        """`name` removed; nothing to do when it is not there."""
        try:
            self._call(f"remove {self.location(name)}", lambda: self.fs.rm_file(self._path(name)))
        except FileNotFoundError:
            pass

    def remove_tree(self, name: str) -> None:
        """The folder (prefix) `name` and everything under it removed; nothing to do when it is not there."""
        if self.exists(name):
            try:
                self._call(f"remove {self.location(name)}", lambda: self.fs.rm(self._path(name), recursive=True))
            except FileNotFoundError:
                pass

    def local_folder(self) -> str | None:
        """DEST's own folder when it is local (work files may live there), else None."""
        return None if self.remote else self.root


def embedding_name(stem: str) -> str:
    return f"{EMBEDDINGS}/{stem}.parquet"


def assign_name(stem: str) -> str:
    return f"{ASSIGN}/{stem}.npy"
