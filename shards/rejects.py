"""Reject records: what was left out, why, and what a person (or `--retry-failed`) needs to act on it.

In memory and in the per-shard stats files a reject is `[source, reason, detail, info]`, where `info`
holds the sample's `key` and, for downloads, the last HTTP `status` and the `attempts` made. Older stats
files hold `[source, reason, detail]`. `DEST/rejects.jsonl` has one line per reject::

    {"source": ..., "reason": ..., "detail": ..., "key": ..., ["url": ..., "status": 503, "attempts": 3]}
"""
from __future__ import annotations

import json

from .download import retryable
from .errors import ShardError
from .keys import without_credentials


def record(source: str, reason: str, detail: str, info: dict) -> list:
    """A reject as kept; a URL's user and password never in it (error messages may quote the URL)."""
    return [without_credentials(source), reason, without_credentials(detail), info]


def line(r) -> dict:
    doc = {"source": r[0], "reason": r[1], "detail": r[2]}
    info = r[3] if len(r) > 3 else {}
    doc.update(info)
    if "attempts" in info:
        doc["url"] = r[0]
    return doc


def jsonl_bytes(rejected) -> bytes:
    return "".join(json.dumps(line(r)) + "\n" for r in rejected).encode("utf-8")


def parse(raw: bytes | None, where: str = "rejects.jsonl") -> list[list]:
    """The records of a rejects.jsonl; ShardError naming the first line that is not one (cut short, edited)."""
    out = []
    for n, text in enumerate((raw or b"").decode("utf-8", "replace").splitlines(), 1):
        try:
            doc = json.loads(text)
            info = {k: v for k, v in doc.items() if k not in ("source", "reason", "detail", "url")}
            out.append(record(doc["source"], doc["reason"], doc["detail"], info))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ShardError(f"{where} line {n} is not a reject record (cut short or edited?): "
                             f"{text[:80]!r}") from None
    return out


def can_retry(r) -> bool:
    """A download that failed for a reason that may pass (down host, throttling, timeout)."""
    info = r[3] if len(r) > 3 else {}
    return "attempts" in info and "key" in info and retryable(r[1], info.get("status"))
