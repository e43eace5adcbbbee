"""How `shards create` options are declared: as dataclass fields whose metadata holds the help text (and
optionally flag, metavar, action, parse), from which ops.options builds the command line; and sizes as
people write them (`500MB`, `1GiB`)."""
from __future__ import annotations

import argparse
import re
from dataclasses import field

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def byte_size(text: str) -> int:
    """`500MB`, `1GiB`, `2000000` -> bytes (an argparse type: a bad size is a one-line usage error)."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower().rstrip("b") if m else None
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 1GiB, 2000000)")
    return int(float(m.group(1)) * _UNITS[unit])


def option(default, help: str, **meta):
    """A dataclass field that is also a command-line option (help is argparse-formatted: %(default)s)."""
    return field(default=default, metadata={"help": help, **meta})
