"""The run plan: options that shape the output, and their fingerprint (the input order, --shuffle and
--part slices are shards.discover's).

Two runs with the same fingerprint produce the same shards byte for byte, so a rerun into a destination
holding that fingerprint continues it; a different fingerprint there is refused (never mixed).
Options that do not change the output (workers, timeout, progress) are not part of it.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

from .errors import ShardError
from .options import byte_size, option
from .validate import DEDUP_MODES, MAX_PIXELS, MIN_SIDE, REENCODE_MODES, RESIZE_MODES, Options

_PREFIX = re.compile(r"^[A-Za-z0-9_-]+$")
FORMATS = ("tar", "parquet")


def parse_formats(fmt) -> tuple[str, ...]:
    """`tar`, `parquet`, `tar,parquet` (or a list) -> the output formats, the first one primary."""
    names = [f.strip().lower() for f in (fmt.split(",") if isinstance(fmt, str) else fmt)]
    bad = [f for f in names if f not in FORMATS]
    if not names or bad or "" in names or len(set(names)) != len(names):
        raise ShardError(f"--format must be tar, parquet or both (tar,parquet), got {fmt!r}")
    return tuple(names)


@dataclass(frozen=True)
class Plan:
    """The options that shape the output. Each field with help is a `shards create` flag (ops.cli_shards)."""
    format: str = option(  # one format, or several comma-separated (the first is the primary)
        "tar", "tar: webdataset shards (<key>.jpg|png|webp + <key>.json) each with a DALI .idx index; parquet: one "
               "row per image (image bytes + metadata columns), row groups of 256; tar,parquet: both, the same "
               "samples in the same shards, manifest.json for the first format listed and manifest-<format>.json "
               "for the other (default: %(default)s)", metavar="FORMAT")
    samples_per_shard: int = option(1000, "images per shard; the last shard may hold fewer (default: %(default)s)",
                                    metavar="N")
    max_shard_bytes: int = option(0, "also start a new shard before one would pass SIZE (500MB, 1GiB); 0 = no limit",
                                  metavar="SIZE", parse=byte_size)
    prefix: str = option("shard", "shard file names are P-NNNNNN.tar / .parquet; letters, digits, '_' and '-' "
                                  "(default: %(default)s)", metavar="P")
    min_size: int = option(MIN_SIDE, "reject images whose shorter side is under PX as too_small "
                                     "(default: %(default)s)", metavar="PX")
    max_size: int = option(0, "resize images whose longer side (see --resize-mode) is over PX (re-encoded as "
                              "JPEG); 0 = keep size; never upscales", metavar="PX")
    resize_mode: str = option("longer", "longer: cap the longer side at --max-size; shorter: cap the shorter side "
                                        "(the size training crops from); center_crop: cap the shorter side, then "
                                        "keep the centre square (default: %(default)s)", choices=RESIZE_MODES)
    quality: int = option(95, "JPEG quality of re-encoded images (default: %(default)s)", metavar="Q")
    reencode: str = option("auto", "auto: only images that need a change; always: every image; never: keep "
                                   "original bytes and reject what would need a change as needs_reencode "
                                   "(default: %(default)s)", choices=REENCODE_MODES)
    max_pixels: int = option(MAX_PIXELS, "per-file pixel budget; bigger images are rejected as decompression_bomb "
                                         "(default: %(default)s)", metavar="N")
    dedup: str = option("exact", "exact: same decoded pixels; perceptual: same picture (resized, re-compressed) "
                                 "by a 64-bit difference hash; later copies are rejected as duplicate "
                                 "(default: %(default)s)", choices=DEDUP_MODES)
    dedup_threshold: int = option(4, "perceptual: hashes this many bits apart or fewer are duplicates "
                                     "(default: %(default)s)", metavar="BITS")
    shuffle: bool = option(False, "mix all inputs across shards (a seeded permutation) so each shard is "
                                  "representative")
    seed: int = option(0, "seed of --shuffle (default: %(default)s)")
    part: tuple[int, int] = option(  # (i, N): this host's slice of the input order
        (0, 1), "process only the i-th of N slices of the inputs, into DEST/part-IIIII-of-NNNNN; run all N (e.g. "
                "a Kubernetes Indexed Job), then `shards merge DEST`", metavar="i/N", parse=str)
    # table columns ("" = the usual names: url/URL, caption/TEXT/text)
    url_col: str = option("", "the tables' URL column (default: url, URL, image_url or path, the first found)",
                          metavar="NAME")
    caption_col: str = option("", "the tables' caption column, stored as `caption` (default: caption, TEXT or "
                                  "text)", metavar="NAME")
    extra_cols: str = option("", "table columns to keep besides URL and caption (default: all of them)",
                             metavar="A,B")  # comma-separated; "" = every other column
    # the download options that change the output, from shards.download.HttpOptions
    respect_opt_out: bool = True      # X-Robots-Tag noai & co. -> opted_out
    max_download_bytes: int = 64 << 20

    def check(self) -> None:
        def bad(msg):
            raise ShardError(msg)
        parse_formats(self.format)
        if not isinstance(self.samples_per_shard, int) or self.samples_per_shard < 1:
            bad(f"samples per shard must be a positive integer, got {self.samples_per_shard!r}")
        if self.max_shard_bytes < 0:
            bad(f"--max-shard-bytes must be 0 (no limit) or positive, got {self.max_shard_bytes}")
        if not _PREFIX.match(self.prefix or ""):
            bad(f"prefix must be letters, digits, '_' or '-', got {self.prefix!r}")
        if self.min_size < 1:
            bad(f"--min-size must be at least 1, got {self.min_size}")
        if self.max_size and self.max_size < self.min_size:
            bad(f"--max-size {self.max_size} is smaller than --min-size {self.min_size}")
        if self.max_size < 0:
            bad(f"--max-size must be 0 (no resize) or positive, got {self.max_size}")
        if not 1 <= self.quality <= 100:
            bad(f"--quality must be 1..100, got {self.quality}")
        if self.reencode not in REENCODE_MODES:
            bad(f"--reencode must be one of {', '.join(REENCODE_MODES)}, got {self.reencode!r}")
        if self.reencode == "never" and self.max_size:
            bad("--max-size needs re-encoding: it cannot be combined with --reencode never")
        if self.dedup not in DEDUP_MODES:
            bad(f"--dedup must be one of {', '.join(DEDUP_MODES)}, got {self.dedup!r}")
        if not 0 <= self.dedup_threshold <= 32:
            bad(f"--dedup-threshold must be 0..32 bits, got {self.dedup_threshold}")
        if self.resize_mode not in RESIZE_MODES:
            bad(f"--resize-mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.max_download_bytes < 0:
            bad(f"--max-download-bytes must be 0 (no limit) or positive, got {self.max_download_bytes}")
        if self.max_pixels < 1:
            bad(f"--max-pixels must be positive, got {self.max_pixels}")
        i, n = self.part
        if not (n >= 1 and 0 <= i < n):
            bad(f"--part must be i/N with 0 <= i < N, got {i}/{n}")

    @property
    def formats(self) -> tuple[str, ...]:
        return parse_formats(self.format)

    def normalise_options(self) -> Options:
        return Options(min_size=self.min_size, max_size=self.max_size, resize_mode=self.resize_mode, quality=self.quality,
                       reencode=self.reencode, max_pixels=self.max_pixels, dedup=self.dedup)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["part"] = f"{self.part[0]}/{self.part[1]}"
        return d


def parse_part(text: str | None) -> tuple[int, int]:
    if not text:
        return (0, 1)
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise ShardError(f"--part must look like i/N (e.g. 0/4), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def fingerprint(plan: Plan, sources: list[str], identity: str) -> str:
    """sha256 of the output-shaping options, the sources and what the inputs are (shards.discover)."""
    h = hashlib.sha256(json.dumps({"plan": plan.as_dict(), "sources": sources}, sort_keys=True).encode())
    h.update(identity.encode())
    return h.hexdigest()


def differences(old: dict, new: dict) -> str:
    diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k != "fingerprint"]
    return "; ".join(diff) or "the input files changed"
