"""Warnings about skipped images, aggregated: at a 0.1 % bad rate a billion images would otherwise log a
million lines. The first skip of each reason is logged at once (with its key); after that, one line per
reason and interval with the count and a few example keys. Metrics still count every sample (the stream's
`skipped` counter); this only shapes the log.
"""
from __future__ import annotations

import logging
import time
from collections import Counter

from .image_check import REASONS as IMAGE_REASONS

# Every reason the training loader counts a skipped sample under: the metrics export each one from the start
# (at 0), so a rate or alert has a series before the first skip. tests/test_backends.py fails when the code
# counts a reason that is not here.
SKIP_REASONS = IMAGE_REASONS + (  # image_check: what no backend can decode (also found by the OpenCV workers)
    "no_image",              # readers: a tar sample or parquet row without image bytes
    "too_large",             # readers: a tar member too big to read into memory
    "unreadable_row_group",  # readers: a parquet row group that fails to read, all its rows
    "missing_in_shard",      # stream: the shard holds fewer samples than its manifest says (a truncated tar)
    "shard_unreadable",      # stream: the shard could not be read after its retries
    "epoch_remainder",       # stream: dropped so that every rank gets the same number of samples per epoch
    "decoder_error",         # backends: inside a DALI run that failed on an image the pre-flight check let pass
    "partial_last_batch",    # batching: with --epochs, the end of the run that cannot fill a whole batch
)
# Counted by the labelled streams of evaluation only (not training metrics)
EVAL_SKIP_REASONS = ("no_label", "unknown_class")


class SkipLog:
    def __init__(self, logger: logging.Logger, what: str = "undecodable images skipped", interval: float = 60.0,
                 examples: int = 3, clock=time.monotonic):
        self.log, self.what, self.interval, self.examples, self.clock = logger, what, interval, examples, clock
        self.counts: Counter = Counter()
        self.keys: dict[str, list[str]] = {}
        self.seen: set[str] = set()
        self.since = clock()

    def note(self, reason: str, key: str) -> None:
        if reason not in self.seen:  # the first of its kind, right away
            self.seen.add(reason)
            self.log.warning("%s (%s): %s (further ones are logged every %g s)", self.what, reason, key, self.interval)
        else:
            self.counts[reason] += 1
            examples = self.keys.setdefault(reason, [])
            if len(examples) < self.examples:
                examples.append(key)
        if self.clock() - self.since >= self.interval:
            self.flush()

    def flush(self) -> None:
        """One line per reason for what was noted since the last flush."""
        seconds = self.clock() - self.since
        for reason, n in sorted(self.counts.items()):
            self.log.warning("%s (%s): %d in the last %.0f s, e.g. %s", self.what, reason, n, seconds,
                             ", ".join(self.keys[reason]))
        self.counts.clear()
        self.keys.clear()
        self.since = self.clock()
