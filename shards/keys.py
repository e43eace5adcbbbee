"""Sample keys: stable across reruns, safe for webdataset and DALI.

webdataset and DALI split a tar member name at the FIRST dot of its basename into
key + extension, so a key must not contain dots (or slashes). Keys are derived from the
input's path relative to its source root, so the same tree always gives the same keys.
"""
from __future__ import annotations

import hashlib
import re

# Member names `<key>.<ext>` must fit the 100-byte ustar name field (no pax headers,
# which keeps the tar headers simple and byte-deterministic): key <= 90 leaves room for ".json".
MAX_KEY_LEN = 90
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def natural_key(relpath: str) -> str:
    """`train/n01440764/x.JPEG` -> `train_n01440764_x` (extension dropped, unsafe chars -> `_`)."""
    relpath = relpath.replace("\\", "/")
    head, _, name = relpath.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name  # ".gitignore" has no extension
    key = _UNSAFE.sub("_", f"{head}/{stem}" if head else stem) or "_"
    if len(key) > MAX_KEY_LEN:
        # Keep a readable prefix and make it unique again with a hash of the full path.
        digest = hashlib.sha1(relpath.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        key = f"{key[:MAX_KEY_LEN - 17]}_{digest}"
    return key


def assign_keys(relpaths: list[str]) -> list[str]:
    """One unique key per path, in the given (deterministic) order.

    Collisions (`a b.jpg` vs `a_b.jpg`, `x.jpg` vs `x.png`, same path under two sources)
    keep the natural key for the first path and give later ones `_1`, `_2`, ... A suffix
    never takes a key that some other path would get naturally, so adding a file `x_1.jpg`
    later does not rename it.
    """
    natural = [natural_key(p) for p in relpaths]
    reserved = set(natural)
    used: set[str] = set()
    keys = []
    for key in natural:
        if key in used:
            n = 1
            while f"{key}_{n}" in used or f"{key}_{n}" in reserved:
                n += 1
            key = f"{key}_{n}"
        used.add(key)
        keys.append(key)
    return keys


def json_safe(s: str) -> str:
    """Undecodable file names (surrogate escapes) cannot go into JSON/parquet strings as they are."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# `scheme://user:password@host...`: everything between `://` and the last `@` before the path
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s]*@")


def without_credentials(text: str) -> str:
    """`http://user:secret@host/x.jpg` -> `http://host/x.jpg`, for every URL in `text`: what is stored or
    logged about an input (its source in shards, stats and rejects, error details) never holds a password.
    The request itself still uses them (the locator keeps the URL as given)."""
    return _USERINFO.sub(r"\1", text) if "@" in text else text
