"""The report's thumbnails: the images at chosen (shard, member) positions, read once per shard and only where
they are: a tar's members through its DALI index (byte ranges), a parquet shard's rows through the row groups
that hold them, anything else (a tar without index, an index that disagrees with the selection's keys) by
reading the shard through the pipeline's reader, the order `member` counts in. A position that cannot be
read costs only its own thumbnail, which the report shows as missing with the reason."""
from __future__ import annotations

import base64
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mocostream.pipeline.filesystems import Storage
from mocostream.pipeline.readers import IMAGE_EXTS, MAX_MEMBER_BYTES, read_samples
from mocostream.pipeline.shard import Shard
from mocostream.pipeline.sources import shard_format

log = logging.getLogger(__name__)

MAX_PIXELS = 89478485  # the shard tool's default --max-pixels: nothing larger is decoded for a thumbnail


@dataclass(frozen=True)
class Thumb:
    uri: str | None  # a data: URI of a small JPEG
    width: int = 0
    height: int = 0
    error: str | None = None  # why there is no image


def member_key(name: str) -> str:
    """The webdataset key of a tar member name: its path up to the first dot of the last component."""
    folder, _, base = name.rpartition("/")
    return (folder + "/" if folder else "") + base.split(".", 1)[0]


def _checked(member: int, want: str, key: str, data: bytes) -> bytes | str:
    return data if key == want else f"the shard holds {key!r} at member {member}, the selection {want!r}"


def _tar_by_index(url: str, members: dict[int, str], storage: Storage) -> dict[int, bytes | str] | None:
    """The members' images by byte ranges from the tar's `.idx` (format v1.2, which names members); None
    when there is no usable index or it names another key than the selection does at a member."""
    try:
        lines = storage.read_bytes(url[: -len(".tar")] + ".idx").decode().splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    if not lines or not lines[0].startswith("v1.2 "):
        return None
    out: dict[int, bytes | str] = {}
    ranges: dict[int, tuple[int, int]] = {}
    for member, want in members.items():
        tokens = lines[member + 1].split() if 0 <= member < len(lines) - 1 else []
        if not tokens or len(tokens) % 4:
            return None
        parts = {tokens[i]: (int(tokens[i + 1]), int(tokens[i + 2]), tokens[i + 3]) for i in range(0, len(tokens), 4)}
        if member_key(tokens[3]) != want:
            return None
        ext = next((e for e in IMAGE_EXTS if e in parts), None)
        if ext is None or parts[ext][1] > MAX_MEMBER_BYTES:
            out[member] = "no image in the sample" if ext is None else f"image of {parts[ext][1]} bytes"
        else:
            ranges[member] = (parts[ext][0], parts[ext][0] + parts[ext][1])
    if ranges:
        fs, path = storage.filesystem(url)
        starts, ends = zip(*ranges.values())
        got = storage.retrying(f"read {url}", lambda: fs.cat_ranges([path] * len(ranges), list(starts), list(ends),
                                                                     on_error="raise"))
        out.update(zip(ranges, got))
    return out


def _parquet_rows(url: str, members: dict[int, str], storage: Storage) -> dict[int, bytes | str]:
    """The members' images from the row groups that hold them (rows count across row groups)."""
    import pyarrow.parquet as pq

    out: dict[int, bytes | str] = {}
    stem = url.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    with storage.open(url) as f:
        pf = pq.ParquetFile(f)
        columns = [c for c in ("key", "image") if c in pf.schema_arrow.names]
        if "image" not in columns:
            return {m: "the shard has no image column" for m in members}
        start = 0
        for group in range(pf.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            mine = sorted(m for m in members if start <= m < start + n)
            if mine:
                table = pf.read_row_group(group, columns=columns).take([m - start for m in mine])
                keys = table.column("key").to_pylist() if "key" in columns else [None] * len(mine)
                for m, key, image in zip(mine, keys, table.column("image").to_pylist()):
                    key = str(key) if key not in (None, "") else f"{stem}-row{m}"  # as the reader names it
                    out[m] = _checked(m, members[m], key, image) if image else "no image in the row"
            start += n
    return out


def _whole_shard(url: str, fmt: str, members: dict[int, str], storage: Storage) -> dict[int, bytes | str]:
    """The members' images from one read of the whole shard, in the pipeline reader's order."""
    out: dict[int, bytes | str] = {}
    last = max(members)
    for member, sample in enumerate(read_samples(Shard(url, None, fmt), storage.read_bytes(url))):
        if member in members:
            out[member] = sample.error or _checked(member, members[member], sample.key, sample.data)
        if member >= last:
            break
    return out


def shard_images(url: str, members: dict[int, str], storage: Storage) -> dict[int, bytes | str]:
    """member -> image bytes or why there are none, for `members` (member index -> the selection's key)."""
    try:
        fmt = shard_format(url)
        got = _parquet_rows(url, members, storage) if fmt == "parquet" else _tar_by_index(url, members, storage)
        if got is None:
            got = _whole_shard(url, fmt, members, storage)
    except Exception as e:  # a missing or unreadable shard costs its thumbnails only
        log.warning("shard not readable for the report: %s (%s: %s)", url, type(e).__name__, e)
        return {m: f"shard not readable: {type(e).__name__}: {str(e)[:160]}" for m in members}
    return {m: got.get(m, "no such member in the shard") for m in members}


def thumbnail(data: bytes, px: int, quality: int = 80) -> Thumb:
    """A JPEG no larger than px x px as a data: URI; undecodable or oversized images give an error."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                return Thumb(None, error=f"{img.width}x{img.height} pixels, over {MAX_PIXELS}")
            img.draft("RGB", (px, px))  # JPEG: decode at a reduced scale, no larger than needed
            small = img.convert("RGB")
        small.thumbnail((px, px))
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=quality)
    except Exception as e:
        return Thumb(None, error=f"not decodable: {type(e).__name__}: {str(e)[:120]}")
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return Thumb(uri, small.width, small.height)


def read_thumbnails(wanted, storage: Storage, px: int, threads: int = 8) -> dict[tuple[str, int], Thumb]:
    """(shard, member) -> Thumb for `wanted`, an iterable of (shard, member, key); shards read in parallel."""
    by_shard: dict[str, dict[int, str]] = {}
    for shard, member, key in wanted:
        by_shard.setdefault(shard, {})[int(member)] = key

    def one(shard: str) -> dict[tuple[str, int], Thumb]:
        got = shard_images(shard, by_shard[shard], storage)
        return {(shard, m): thumbnail(v, px) if isinstance(v, bytes) else Thumb(None, error=v) for m, v in got.items()}

    out: dict[tuple[str, int], Thumb] = {}
    if by_shard:
        with ThreadPoolExecutor(max(1, min(threads, len(by_shard)))) as pool:
            for part in pool.map(one, sorted(by_shard)):
                out.update(part)
    missing = sum(t.error is not None for t in out.values())
    if missing:
        log.warning("%d of %d thumbnails not readable (shown as missing with the reason)", missing, len(out))
    return out
