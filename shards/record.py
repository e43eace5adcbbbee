"""A decoded sample made ready to append: encoded in the decode worker, appended by the main process.

The main process writes every shard in input order, so whatever it does per sample limits how well the
tool scales with workers. Workers therefore send back a `Record` whose tar members (headers, image, JSON,
padding) are already rendered: for a tar shard the main process only writes and hashes one buffer.
"""
from __future__ import annotations

from dataclasses import dataclass

from .tar_writer import BLOCK, render, sample_json
from .validate import Sample


@dataclass(frozen=True)
class Record:
    ext: str          # "jpg" | "png" | "webp"
    width: int
    height: int
    digest: str       # dedup hash ("" when dedup is off)
    size: int         # bytes of the image
    meta_size: int    # bytes of the <key>.json member (0 without tar output)
    tar: bytes        # both tar members as a tar shard stores them; b"" without tar output
    image: bytes      # the image bytes when there is no tar output; b"" otherwise (they are inside `tar`)

    @property
    def data(self) -> bytes:
        """The image bytes (parquet's `image` cell)."""
        return self.tar[BLOCK:BLOCK + self.size] if self.tar else self.image


def encode(sample: Sample, key: str, source: str, label: str, extra: dict | None, tar: bool) -> Record:
    """`sample` as a Record; with `tar`, its members rendered exactly as TarShardWriter appends them."""
    if not tar:
        return Record(sample.ext, sample.width, sample.height, sample.digest, len(sample.data), 0, b"", sample.data)
    meta = sample_json(key, source, label, sample, extra)
    return Record(sample.ext, sample.width, sample.height, sample.digest, len(sample.data), len(meta),
                  render(key, sample.ext, sample.data, meta), b"")
