"""Write one webdataset tar shard with deterministic headers, plus its DALI index.

Each sample is two consecutive members, `<key>.<ext>` (image bytes) then `<key>.json`
(metadata). Headers carry no wall-clock or machine identity (mtime 0, uid/gid 0, empty
uname/gname, mode 0644, plain ustar), so the same inputs give byte-identical shards.

The ustar headers are built here rather than by `tarfile` (whose header code cost more CPU than the
rest of the main process together); the bytes are exactly what `tarfile` writes for these members
(USTAR_FORMAT, see tests), and `tarfile`, webdataset and DALI read them back. A sample's members are
rendered by `render` in the decode worker (shards.record); the writer in the main process only appends
them, hashing as it writes, so a finished shard's sha256 needs no second read.
"""
from __future__ import annotations

import hashlib
import json
import tarfile

from .validate import Sample

BLOCK = tarfile.BLOCKSIZE       # 512
RECORD = tarfile.RECORDSIZE     # 10240: tarfile pads the archive to a whole record
MAX_NAME = 100                  # ustar name field (keys are capped so names fit: no prefix, no pax)


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte header tarfile writes for a regular file `name` of `size` bytes, mode 0644,
    uid/gid 0, empty uname/gname, mtime 0 (tarfile.TarInfo.tobuf(USTAR_FORMAT))."""
    raw = name.encode("utf-8")
    if len(raw) > MAX_NAME or size >= 8**11:
        raise ValueError(f"member does not fit a plain ustar header: {name!r} ({size} bytes)")
    h = bytearray(BLOCK)
    h[0:len(raw)] = raw
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8           # checksum is computed with its own field as spaces
    h[156:157] = tarfile.REGTYPE
    h[257:265] = tarfile.POSIX_MAGIC  # b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def sample_json(key: str, source: str, label: str, sample: Sample, extra: dict | None = None) -> bytes:
    meta = {"key": key, "source": source, "label": label,
            "width": sample.width, "height": sample.height, "format": sample.ext}
    for k, v in (extra or {}).items():  # caption, url, ... from the input; never over ours
        meta.setdefault(k, v)
    return json.dumps(meta, separators=(",", ":"), default=str).encode("utf-8")


def _pad(n: int) -> bytes:
    return b"\0" * (-n % BLOCK)


def render(key: str, ext: str, data: bytes, meta: bytes) -> bytes:
    """Both members of one sample, `<key>.<ext>` then `<key>.json`, headers and padding included."""
    return b"".join((ustar_header(f"{key}.{ext}", len(data)), data, _pad(len(data)),
                     ustar_header(f"{key}.json", len(meta)), meta, _pad(len(meta))))


class TarShardWriter:
    suffix = "tar"

    def __init__(self, path: str, extra_fields=None):
        self.path = path
        self.samples = 0
        self.bytes = RECORD  # upper bound of the end-of-archive padding
        self.members: list[tuple[str, int, int, str]] = []  # (ext, data offset, size, name): the DALI index
        self.sha256 = hashlib.sha256()
        self._f = open(path, "wb")
        self._offset = 0

    def cost(self, key: str, source: str, record) -> int:
        """Bytes this sample (a shards.record.Record) adds to the shard."""
        return len(record.tar)

    def add(self, key: str, source: str, label: str, record, extra: dict | None = None) -> None:
        """Append a sample rendered by shards.record.encode (its `tar` members); source, label and extra
        are already in its JSON member."""
        blob, size = record.tar, record.size
        meta_offset = self._offset + BLOCK + size + (-size % BLOCK) + BLOCK
        self.members.append((record.ext, self._offset + BLOCK, size, f"{key}.{record.ext}"))
        self.members.append(("json", meta_offset, record.meta_size, f"{key}.json"))
        self._f.write(blob)
        self.sha256.update(blob)
        self._offset += len(blob)
        self.bytes = RECORD + self._offset
        self.samples += 1

    def index_lines(self) -> list[str]:
        """DALI index lines (wds_index format), from what was written: no second pass over the tar."""
        return [" ".join(" ".join(map(str, m)) for m in self.members[i:i + 2])
                for i in range(0, len(self.members), 2)]

    def close(self) -> None:
        # End of archive as tarfile writes it: two zero blocks, then zeros up to a whole record.
        end = self._offset + 2 * BLOCK
        tail = b"\0" * (2 * BLOCK + (-end % RECORD))
        self._f.write(tail)
        self.sha256.update(tail)
        self._f.close()
        self.bytes = self._offset + len(tail)  # the file's size now

    def digest(self) -> tuple[int, str]:
        """(bytes, sha256 hex) of the closed shard, from what was written."""
        return self.bytes, self.sha256.hexdigest()

    def abort(self) -> None:
        self._f.close()
