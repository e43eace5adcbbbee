"""One `shards create` at a time per destination folder.

Two runs into one DEST would remove each other's temporary files (a run clears a killed run's leftovers
when it starts) and publish over each other's shards. A run therefore holds an exclusive flock on
DEST/.mocostream-create.lock while it works; a second run fails at once with a one-line error. The lock
is the kernel's: a run killed with -9 releases it. The file is removed when the run ends (the holder checks,
after locking, that the file it locked is still the one at the path, so a run that opened it just before
its removal tries again). Remote destinations (s3://) have no such lock: give each writer its own DEST
(`--part` does).
"""
from __future__ import annotations

import fcntl
import os

from .errors import ShardError
from .output import Destination

LOCK_NAME = ".mocostream-create.lock"
_HELD: set[int] = set()  # our lock fds: a forked decode worker closes its copies, so it never holds the lock


def _close_held_in_child() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class DestLock:
    def __init__(self, dest: Destination):
        self.path = dest.join(LOCK_NAME) if dest.local else None
        self.url, self.fd = dest.url, None

    def acquire(self) -> None:
        while self.path is not None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise ShardError(f"another `shards create` (pid {holder}) is writing into {self.url}: wait for "
                                 "it to finish, or use another destination") from None
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                _HELD.add(fd)
                return
            os.close(fd)  # its holder removed it as we opened it: lock the new one

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # still holding the lock: no run can be between open and flock on it
            except FileNotFoundError:
                pass
            _HELD.discard(self.fd)
            os.close(self.fd)
            self.fd = None
