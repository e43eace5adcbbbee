"""The loader's bookkeeping stage on its own (pipeline.batching.Batcher), on a real sample stream: chunks and their
seeds, skips counted and logged with their keys, batches completed across chunks, the partial last batch."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import webdataset as wds

from mocostream.pipeline.batching import Batcher, Views, batch_seed
from mocostream.pipeline.skip_log import SkipLog
from mocostream.pipeline.sources import Shard
from mocostream.pipeline.stream import SampleStream

B = 4


@pytest.fixture
def stream(tmp_path) -> SampleStream:
    """One epoch of 11 tiny samples (the stage never looks at the bytes)."""
    path = tmp_path / "t-000000.tar"
    with wds.TarWriter(str(path)) as w:
        for i in range(11):
            w.write({"__key__": f"s{i:02d}", "jpg": bytes([i]) * 8})
    return SampleStream([Shard(str(path), 11, "tar")], seed=0, world=1, rank=0, shuffle_shards=1, epochs=1)


def batcher(stream: SampleStream) -> Batcher:
    return Batcher(stream, B, seed=5, rank=0, skip_log=SkipLog(logging.getLogger("test-batching")))


def rows(items) -> np.ndarray:
    """A stand-in for augmented views: each row holds its sample's stream position."""
    return np.array([[it.position] for it in items], dtype=np.int64)


def test_chunks_are_cut_after_known_rejects_and_seeded_by_their_first_sample(stream, caplog):
    stage = batcher(stream)
    items = list(stream)
    bad = {items[1].sample.key, items[6].sample.key}
    with caplog.at_level(logging.WARNING, "test-batching"):
        chunks = list(stage.chunks(((it, "corrupt" if it.sample.key in bad else None) for it in items), whole=False))
    assert [[it.position for it in c.items] for c in chunks] == [[0, 2, 3, 4], [5, 7, 8, 9], [10]]
    assert [c.seed for c in chunks] == [batch_seed(5, 0, c.items[0]) for c in chunks]
    assert len({c.seed for c in chunks}) == 3
    assert stream.skipped == {"corrupt": 2}
    assert items[1].sample.key in caplog.text  # the first skip of a reason is logged with its key


def test_a_backend_taking_whole_batches_leaves_the_tail_to_the_partial_count(stream):
    stage = batcher(stream)
    chunks = list(stage.chunks(((it, None) for it in stream), whole=True))
    assert [len(c.items) for c in chunks] == [4, 4]
    batches = list(stage.batches((Views(c.items, rows(c.items), rows(c.items)) for c in chunks), torch.from_numpy))
    assert [b.keys for b in batches] == [[it.sample.key for it in c.items] for c in chunks]
    assert stream.skipped == {"partial_last_batch": 3}


def test_rejected_rows_are_replaced_from_the_next_chunk(stream):
    stage = batcher(stream)
    chunks = list(stage.chunks(((it, None) for it in stream), whole=False))
    views = []
    for c in chunks:  # the backend rejects positions 1 and 6, as a worker finding a bad image would
        reasons = ["truncated" if it.position in (1, 6) else None for it in c.items]
        kept = [it for it, r in zip(c.items, reasons) if r is None]
        views.append(Views(c.items, rows(kept), -rows(kept), reasons))
    batches = list(stage.batches(views, torch.from_numpy))
    assert [b.q.flatten().tolist() for b in batches] == [[0, 2, 3, 4], [5, 7, 8, 9]]
    assert all(torch.equal(b.k, -b.q) for b in batches)
    assert [b.last.position for b in batches] == [4, 9]  # the resume point after each batch
    assert stream.skipped == {"truncated": 2, "partial_last_batch": 1}
