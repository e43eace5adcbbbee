"""Write one webdataset tar shard with deterministic headers, plus its DALI index.

Each sample is two consecutive members, `<key>.<ext>` (image bytes) then `<key>.json`
(metadata). Headers carry no wall-clock or machine identity (mtime 0, uid/gid 0, empty
uname/gname, mode 0644, plain ustar), so the same inputs give byte-identical shards.
"""
from __future__ import annotations

import io
import json
import tarfile

from .validate import Sample


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def sample_json(key: str, source: str, label: str, sample: Sample) -> bytes:
    meta = {"key": key, "source": source, "label": label,
            "width": sample.width, "height": sample.height, "format": sample.ext}
    return json.dumps(meta, separators=(",", ":")).encode("utf-8")


class TarShardWriter:
    suffix = "tar"

    def __init__(self, path: str):
        self.path = path
        self.samples = 0
        # ustar (not pax/gnu): keys are capped so names fit, and no extended headers appear.
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, source: str, label: str, sample: Sample) -> None:
        for name, data in ((f"{key}.{sample.ext}", sample.data),
                           (f"{key}.json", sample_json(key, source, label, sample))):
            self._tar.addfile(_member(name, len(data)), io.BytesIO(data))
        self.samples += 1

    def close(self) -> None:
        self._tar.close()

    def abort(self) -> None:
        try:
            self._tar.close()
        except Exception:
            pass
