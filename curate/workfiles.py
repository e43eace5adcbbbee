"""Where the select stage keeps its work files (buckets, per-bucket results), seen by every rank of the job.

- A local folder: --work-dir, else DEST/.select-work when DEST is local, else (one process) a temporary folder.
  Several ranks share it when it is on a filesystem they all see (one node, or a shared mount).
- DEST's storage (`s3://...`): several ranks with a remote DEST and no --work-dir keep the work files under
  DEST/.select-work/ through that storage; each rank stages what it writes and reads in a local scratch folder.
A file is written to `staging(name)`, then `publish(name)` makes it visible to all ranks at once (a rename, or
one upload); `fetch(name)` gives a local path to read it. The folder is tied to the options and the job's
size (`params`): a rerun with the same ones continues from the files there, a rerun with others starts afresh.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from .layout import Dest

FOLDER = ".select-work"
PARAMS = "params.json"


class LocalWork:
    def __init__(self, root: str):
        self.root = root
        os.makedirs(root, exist_ok=True)

    def describe(self) -> str:
        return self.root

    def staging(self, name: str) -> str:
        return os.path.join(self.root, f".{name}.tmp-{os.getpid()}")

    def publish(self, name: str) -> None:
        os.replace(self.staging(name), os.path.join(self.root, name))

    def exists(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.root, name))

    def fetch(self, name: str) -> str:
        return os.path.join(self.root, name)

    def remove(self, name: str) -> None:
        try:
            os.remove(os.path.join(self.root, name))
        except FileNotFoundError:
            pass

    def read_params(self) -> dict | None:
        return json.loads(open(self.fetch(PARAMS)).read()) if self.exists(PARAMS) else None

    def reset(self, params: dict) -> None:
        """Empty the folder and record the options it now belongs to."""
        shutil.rmtree(self.root, ignore_errors=True)
        os.makedirs(self.root, exist_ok=True)
        with open(self.fetch(PARAMS), "w") as f:
            json.dump(params, f)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def close(self) -> None:
        pass


class RemoteWork:
    """Work files under DEST/.select-work/ through DEST's storage, staged in a local scratch folder."""

    def __init__(self, dest: Dest):
        self.dest = dest
        self.scratch = tempfile.mkdtemp(prefix="mocostream-select-")

    def describe(self) -> str:
        return self.dest.location(FOLDER)

    def _name(self, name: str) -> str:
        return f"{FOLDER}/{name}"

    def staging(self, name: str) -> str:
        return os.path.join(self.scratch, name)

    def publish(self, name: str) -> None:
        self.dest.put_file(self.staging(name), self._name(name))
        self.remove_local(name)

    def exists(self, name: str) -> bool:
        return self.dest.exists(self._name(name))

    def fetch(self, name: str) -> str:
        local = os.path.join(self.scratch, f"fetched-{name}")
        if not os.path.exists(local):
            self.dest.get_file(self._name(name), local)
        return local

    def remove_local(self, name: str) -> None:
        for path in (self.staging(name), os.path.join(self.scratch, f"fetched-{name}")):
            if os.path.exists(path):
                os.remove(path)

    def remove(self, name: str) -> None:
        self.remove_local(name)
        self.dest.remove(self._name(name))

    def read_params(self) -> dict | None:
        return self.dest.read_json(self._name(PARAMS))

    def reset(self, params: dict) -> None:
        self.dest.remove_tree(FOLDER)
        self.dest.write_json(self._name(PARAMS), params)

    def clear(self) -> None:
        self.dest.remove_tree(FOLDER)

    def close(self) -> None:
        """This rank's scratch folder removed (every rank calls it; `clear` is the shared folder, once)."""
        shutil.rmtree(self.scratch, ignore_errors=True)


def open_work(dest: Dest, work_dir: str | None, world: int):
    """The work store of this job (see the module's docstring)."""
    if work_dir:
        return LocalWork(work_dir)
    if dest.local_folder():
        return LocalWork(os.path.join(dest.local_folder(), FOLDER))
    return RemoteWork(dest) if world > 1 else LocalWork(tempfile.mkdtemp(prefix="mocostream-select-"))
