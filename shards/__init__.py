"""shards: raw images (folders, tar archives, URL lists, parquet) -> validated, normalised, deduplicated
webdataset tar / parquet shards + manifest; resumable, parallel, local or s3://.

Public API: `create_shards`, `verify`, `inspect`, `merge`, `CreateReport`, `ShardError`, `REASONS`.
Dependencies point one way: from `pipeline` it imports only the image checks (`pipeline.dali_check`,
`pipeline.image_check`), so a shard it validates passes exactly the rules the loader trusts, and the storage
factory (`pipeline.filesystems`), so it writes with the trainer's timeouts and retries; `pipeline` never
imports `shards`. It does not import moco_core or ops.
"""
from .create import CreateReport, create_shards
from .errors import ShardError
from .inspect import inspect
from .merge import merge
from .validate import REASONS
from .verify import verify

__all__ = ["CreateReport", "ShardError", "REASONS", "create_shards", "inspect", "merge", "verify"]
