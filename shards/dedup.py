"""Duplicate detection: `exact` (hash of the decoded pixels) or `perceptual` (64-bit difference hash).

Hashes are computed in the decode workers (`image_digest`); the decision is taken in input order in
the main process (`Deduper`), so it is deterministic: the first occurrence is kept, later ones are
rejected as `duplicate` naming the kept key.

- exact: sha256 (first 128 bits) of mode, size and decoded RGB pixels (after EXIF rotation). Catches byte copies
  and the same picture stored in another lossless container or with other metadata.
- perceptual: dHash (9x8 greyscale, one bit per horizontal gradient sign); two images whose hashes
  differ in at most `threshold` bits are the same picture (resized, re-compressed copies). Lookup uses
  the pigeonhole trick: split the 64 bits into threshold+1 bands; a match within the threshold agrees
  exactly on at least one band, so each band is an exact-match dict (no all-pairs scan).
"""
from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

DEFAULT_THRESHOLD = 4  # bits of 64; resized/re-encoded copies measure 0-2, distinct photos ~20-35


def dhash(img: Image.Image) -> int:
    small = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BILINEAR, reducing_gap=2.0),
                       dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def image_digest(img: Image.Image, mode: str) -> str:
    """Hex digest of an (upright, RGB) image for `mode` ("exact" | "perceptual")."""
    if mode == "perceptual":
        return f"{dhash(img):016x}"
    h = hashlib.sha256(f"{img.mode}{img.size}".encode())
    h.update(memoryview(np.ascontiguousarray(np.asarray(img))).cast("B"))  # ~2x faster than tobytes()
    return h.hexdigest()[:32]


class Deduper:
    """Remembers kept samples' digests; `check` returns the key of an earlier match or None."""

    def __init__(self, mode: str, threshold: int = DEFAULT_THRESHOLD):
        self.mode, self.threshold = mode, threshold
        self._exact: dict[str, str] = {}
        nbands = threshold + 1
        edges = [round(64 * i / nbands) for i in range(nbands + 1)]
        self._bands = [(lo, hi) for lo, hi in zip(edges, edges[1:])]
        self._index: list[dict[int, list[tuple[int, str]]]] = [{} for _ in self._bands]

    def _band_values(self, h: int) -> list[int]:
        return [(h >> lo) & ((1 << (hi - lo)) - 1) for lo, hi in self._bands]

    def check(self, digest: str) -> str | None:
        if self.mode == "none" or not digest:
            return None
        if self.mode == "exact":
            return self._exact.get(digest)
        h = int(digest, 16)
        best: tuple[int, str] | None = None
        for table, value in zip(self._index, self._band_values(h)):
            for other, key in table.get(value, ()):
                d = (h ^ other).bit_count()
                if d <= self.threshold and (best is None or d < best[0]):
                    best = (d, key)
        return best[1] if best else None

    def add(self, digest: str, key: str) -> None:
        if self.mode == "none" or not digest:
            return
        if self.mode == "exact":
            self._exact.setdefault(digest, key)
            return
        h = int(digest, 16)
        for table, value in zip(self._index, self._band_values(h)):
            table.setdefault(value, []).append((h, key))
