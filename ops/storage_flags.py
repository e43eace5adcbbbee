"""The storage flags of the commands that are not `train` (eval, export, shards): `--storage-timeout`,
`--storage-retries` (and, where a data spec is read, `--allow-external-shards`), with train's help text and
defaults (TrainConfig's fields), overridable as there by MOCOSTREAM_STORAGE_TIMEOUT / _RETRIES; they build
the one Storage that the command's readers and writers use."""
from __future__ import annotations

import argparse
import os

from mocostream.pipeline.filesystems import Storage, StorageConfig

from .config import ConfigError, TrainConfig, env_var
from .options import flag_of, option_fields, plain_type

FLAGS = ("storage_timeout", "storage_retries")
EXTERNAL = "allow_external_shards"


def add_storage_flags(parser: argparse.ArgumentParser, external: bool = False) -> None:
    fields = {f.name: f for f in option_fields(TrainConfig)}
    for name in FLAGS:
        f = fields[name]
        # argparse parses a text default with `type`: a bad environment value is a one-line usage error
        default = os.environ.get(env_var(name), f.default)
        parser.add_argument(flag_of(f), type=plain_type(TrainConfig, name), default=default, metavar="N",
                            help=f"{f.metadata['help']} (default: %(default)s)")
    if external:
        parser.add_argument(flag_of(fields[EXTERNAL]), action="store_true", help=fields[EXTERNAL].metadata["help"])


def storage_from_args(args: argparse.Namespace) -> Storage:
    """The command's Storage, from the flags add_storage_flags added."""
    if not (args.storage_retries >= 0 and args.storage_timeout > 0):
        raise ConfigError("--storage-retries >= 0, --storage-timeout > 0")
    return Storage(StorageConfig(retries=args.storage_retries, read_timeout=args.storage_timeout,
                                 allow_external_shards=getattr(args, EXTERNAL, False)))
