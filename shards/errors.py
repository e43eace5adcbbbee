"""The one exception the shard tool raises for problems the user can fix."""
from __future__ import annotations


class ShardError(Exception):
    """A user error (missing source, bad option, unwritable destination).

    `user_error = True` tells the `mocostream` CLI to print a one-line
    `mocostream: error: <msg>` and exit 2 instead of showing a traceback.
    """

    user_error = True
