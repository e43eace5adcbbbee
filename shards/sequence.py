"""The shard sequence of one run: opens shard N lazily in every output format, publishes it atomically
on a background thread when full (tar: + DALI .idx, then its stats file: the checkpoint), and keeps the
accounting of the input range each shard covers. Also the run's report object, CreateReport.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .background import InOrder
from .discover import InputFile
from .manifest import by_reason
from .output import Destination
from .parquet_writer import ParquetShardWriter
from .plan import Plan
from .record import Record
from .stats import stats_bytes, stats_name
from .tar_writer import TarShardWriter
from .wds_index import write_index

WRITERS = {"tar": TarShardWriter, "parquet": ParquetShardWriter}


@dataclass
class CreateReport:
    shards: list[dict]                                            # as in manifest["shards"] (primary format)
    written: int
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # (source, reason, detail)
    inputs: int = 0
    seconds: float = 0.0
    manifest_url: str = ""
    report: dict = field(default_factory=dict)                    # as in DEST/report.json
    resumed_from: int = 0                                         # inputs already done by an earlier run
    already_complete: bool = False                                # the destination was finished before
    by_format: dict[str, list[dict]] = field(default_factory=dict)  # every format's shards (shards = the first's)
    warnings: list[str] = field(default_factory=list)             # one line each, for the user

    def rejected_by_reason(self) -> dict[str, int]:
        return by_reason(self.rejected)


class ShardSequence:
    """Opens shard N lazily (one writer per output format), hands it to the publisher thread when full,
    and keeps the accounting of the input range [start, end) each shard covers (its samples and the
    rejects in between). Every format's shard N holds the same samples: a shard ends when any of its
    formats reaches a limit."""

    def __init__(self, dest: Destination, plan: Plan, fp: str, options: dict, extra_fields,
                 entries: dict[str, list[dict]], position: int, labels: set | None = None, appended_to: str = ""):
        self.dest, self.plan, self.fp, self.options, self.extra_fields = dest, plan, fp, options, extra_fields
        self.appended_to = appended_to  # --retry-failed: the manifest these shards are appended to
        self.formats = plan.formats
        self.entries = {f: list(entries.get(f, [])) for f in self.formats}  # published shards, in order
        self.count = len(self.entries[self.formats[0]])                      # shards started
        self.start = position
        self.written: list[list] = []
        self.rejects: list[list] = []
        self.bytes_in = 0
        # distinct labels of the whole set (the manifest's `classes`) and of the open shard (its stats file,
        # so a resumed run knows them); None once a resumed checkpoint did not record them
        self.labels = labels
        self._shard_labels: set = set()
        self._writers: list = []  # (format, name, writer) of the open shard
        self._limit = plan.max_shard_bytes
        self._publisher = InOrder()

    def reject(self, record: tuple, nbytes: int) -> None:
        self.rejects.append(list(record))
        self.bytes_in += nbytes

    def add(self, pos: int, item: InputFile, source: str, label: str, record: Record, nbytes: int) -> None:
        if self._writers and self._limit and any(w.bytes + w.cost(item.key, source, record) > self._limit
                                                 for _, _, w in self._writers):
            self.finish(pos)
        if not self._writers:
            for fmt in self.formats:
                name = f"{self.plan.prefix}-{self.count:06d}.{fmt}"
                self._writers.append((fmt, name, WRITERS[fmt](self.dest.staging_path(name), self.extra_fields)))
            self.count += 1
        for _, _, w in self._writers:
            w.add(item.key, source, label, record, item.extra)
        if label:
            self._shard_labels.add(label)
        self.written.append([item.key, source, record.size, record.digest])
        self.bytes_in += nbytes
        if self._writers[0][2].samples >= self.plan.samples_per_shard:
            self.finish(pos + 1)

    def finish(self, end: int) -> None:
        """Hand the open shard to the publisher thread; the next one can start at once."""
        if self._writers:
            self._publisher.submit(self._publish, self._writers, self.start, end, self.written, self.rejects,
                                   self.bytes_in, sorted(self._shard_labels))
            if self.labels is not None:
                self.labels |= self._shard_labels
        self._writers, self._shard_labels = [], set()
        self.start, self.written, self.rejects, self.bytes_in = end, [], [], 0

    def _publish(self, writers: list, start: int, end: int, written: list, rejects: list, bytes_in: int,
                 labels: list[str]) -> None:
        entries = []
        for fmt, name, writer in writers:
            writer.close()
            entry = {"name": name, "samples": writer.samples}
            entry["bytes"], entry["sha256"] = writer.digest()
            if fmt == "tar":
                # Publish the index before its tar: a visible tar always has its .idx next to it.
                idx_name = name[: -len(".tar")] + ".idx"
                idx_staged = self.dest.staging_path(idx_name)
                write_index(writer.path, idx_staged, writer.index_lines())
                self.dest.publish(idx_staged, idx_name)
                entry["index"] = idx_name
            entry["stats"] = stats_name(name)  # the same file for every format: shard N holds the same samples
            self.dest.publish(writer.path, name)
            entries.append(entry)
        # The stats file last: it is the checkpoint a rerun trusts.
        self.dest.write_bytes(entries[0]["stats"], stats_bytes(self.fp, self.options, entries, start, end,
                                                               written, rejects, bytes_in, labels,
                                                               self.appended_to))
        for fmt, entry in zip(self.formats, entries):
            self.entries[fmt].append(entry)

    def close(self, end: int) -> dict[str, list[dict]]:
        """Finish the last shard and wait until every shard is published; the entries per format."""
        self.finish(end)
        self._publisher.drain()
        self._publisher.close()
        return self.entries

    def abort(self) -> None:
        for _, _, w in self._writers:
            w.abort()
        self._writers = []
        self._publisher.close()  # shards already handed over are complete: let them land


