"""shards: folders of images -> validated, normalised webdataset tar / parquet shards + manifest.

Public API: `create_shards`, `CreateReport`, `ShardError`. Does not import pipeline, moco_core or ops.
"""
from .create import CreateReport, create_shards
from .errors import ShardError
from .validate import REASONS

__all__ = ["CreateReport", "ShardError", "REASONS", "create_shards"]
