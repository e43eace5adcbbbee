"""create_shards: folders of images -> validated, normalised tar/parquet shards + manifest.

Flow: discover inputs (sorted) -> decode + normalise each (validate.py) -> append to the
current shard -> when it holds `samples_per_shard`, finish it (tar: + DALI .idx), hash it and
publish it atomically -> at the end rejects.jsonl, then manifest.json last.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from .discover import InputFile, discover
from .errors import ShardError
from .manifest import build_manifest, file_digest, manifest_bytes, rejects_bytes
from .output import Destination
from .parquet_writer import ParquetShardWriter
from .tar_writer import TarShardWriter
from .validate import JPEG_QUALITY, MAX_PIXELS, MIN_SIDE, Reject, normalise_file
from .wds_index import write_index

WRITERS = {"tar": TarShardWriter, "parquet": ParquetShardWriter}
_PREFIX = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class CreateReport:
    shards: list[dict]                                            # as in manifest["shards"]
    written: int
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # (source, reason, detail)
    inputs: int = 0
    seconds: float = 0.0
    manifest_url: str = ""

    def rejected_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, reason, _ in self.rejected:
            counts[reason] = counts.get(reason, 0) + 1
        return dict(sorted(counts.items()))


def _text(s: str) -> str:
    # Undecodable file names (surrogate escapes) cannot go into JSON/parquet strings as-is.
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class _ShardSequence:
    """Opens shard N lazily, finishes it when full, publishes it and records its manifest entry."""

    def __init__(self, dest: Destination, fmt: str, prefix: str, samples_per_shard: int):
        self.dest, self.fmt, self.prefix, self.per_shard = dest, fmt, prefix, samples_per_shard
        self.entries: list[dict] = []
        self._writer = None
        self._name = ""

    def add(self, item: InputFile, sample) -> None:
        if self._writer is None:
            self._name = f"{self.prefix}-{len(self.entries):06d}.{self.fmt}"
            self._writer = WRITERS[self.fmt](self.dest.staging_path(self._name))
        self._writer.add(item.key, _text(item.path), _text(item.label), sample)
        if self._writer.samples >= self.per_shard:
            self.finish()

    def finish(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        writer.close()
        entry = {"name": self._name, "samples": writer.samples}
        entry["bytes"], entry["sha256"] = file_digest(writer.path)
        if self.fmt == "tar":
            # Publish the index before its tar: a visible tar always has its .idx next to it.
            idx_name = self._name[: -len(".tar")] + ".idx"
            idx_staged = self.dest.staging_path(idx_name)
            write_index(writer.path, idx_staged)
            self.dest.publish(idx_staged, idx_name)
            entry["index"] = idx_name
        self.dest.publish(writer.path, self._name)
        self.entries.append(entry)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


def _check_options(fmt: str, samples_per_shard: int, prefix: str) -> None:
    if fmt not in WRITERS:
        raise ShardError(f"unknown format {fmt!r}: use one of {', '.join(WRITERS)}")
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ShardError(f"samples per shard must be a positive integer, got {samples_per_shard!r}")
    if not _PREFIX.match(prefix or ""):
        raise ShardError(f"prefix must be letters, digits, '_' or '-', got {prefix!r}")


def create_shards(sources: list[str], out: str, fmt: str = "tar", samples_per_shard: int = 1000,
                  prefix: str = "shard", progress: bool = True) -> CreateReport:
    """Turn folders of images into validated, normalised shards plus manifest.json at `out`.

    `sources`: local folders, walked recursively in sorted order. `out`: local folder or
    fsspec URL (s3://bucket/prefix; endpoint and keys from the AWS_* environment variables).
    Raises ShardError for user errors (missing source, bad option, unusable destination);
    bad images never raise, they are recorded in rejects.jsonl with a reason code.
    """
    start = time.monotonic()
    _check_options(fmt, samples_per_shard, prefix)
    inputs = discover(list(sources))
    dest = Destination(out)
    seq = _ShardSequence(dest, fmt, prefix, samples_per_shard)
    rejected: list[tuple[str, str, str]] = []
    bar = tqdm(total=len(inputs), unit="img", desc=f"shards {fmt}", disable=not progress, dynamic_ncols=True)
    try:
        for item in inputs:
            result = normalise_file(item.path)
            if isinstance(result, Reject):
                rejected.append((_text(item.path), result.reason, result.detail))
                bar.set_postfix(rejected=len(rejected), refresh=False)
            else:
                seq.add(item, result)
            bar.update()
        seq.finish()
        seconds = time.monotonic() - start
        options = {"format": fmt, "samples_per_shard": samples_per_shard, "prefix": prefix,
                   "sources": [_text(s) for s in sources], "min_side": MIN_SIDE,
                   "max_pixels": MAX_PIXELS, "jpeg_quality": JPEG_QUALITY}
        manifest = build_manifest(fmt, options, seq.entries, rejected, seconds)
        dest.write_bytes("rejects.jsonl", rejects_bytes(rejected))
        dest.write_bytes("manifest.json", manifest_bytes(manifest))  # last: marks the set complete
    except BaseException:
        seq.abort()
        raise
    finally:
        bar.close()
        dest.close()
    written = manifest["total_samples"]
    assert written + len(rejected) == len(inputs)  # every input is accounted for, never dropped silently
    return CreateReport(shards=seq.entries, written=written, rejected=rejected, inputs=len(inputs),
                        seconds=time.monotonic() - start, manifest_url=dest.location("manifest.json"))
