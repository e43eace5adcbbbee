"""One shard as a data spec or manifest describes it, before it is read: shared by `sources` (which finds
shards) and `readers` (which parses their bytes), so neither imports the other for it."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int | None  # from the manifest; None when unknown
    format: str  # "tar" | "parquet"
    bytes: int | None = None  # from the manifest: checked on every read
    sha256: str | None = None
    validated_by: dict | None = field(default=None, compare=False)  # the manifest's stamp (image_check.trusted)
