"""The epoch plan and the sample stream: balance across ranks, determinism, resume, damage."""
from __future__ import annotations

import io
import os
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from mocostream.pipeline.filesystems import Storage
from mocostream.pipeline.plan import rank_blocks, rank_pieces, samples_per_rank
from mocostream.pipeline.sources import DataSpecError, Shard, resolve_shards, with_counts
from mocostream.pipeline.stream import SampleStream


def write_tar(path, keys):
    with wds.TarWriter(str(path)) as w:
        for k in keys:
            w.write({"__key__": k, "jpg": k.encode(), "json": b"{}"})


def write_parquet(path, keys, row_group_size=3):
    table = pa.table({"key": keys, "image": [k.encode() for k in keys]})
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.fixture
def uneven_tars(tmp_path):
    sizes = [5, 1, 9, 3, 7, 2, 4]  # 7 uneven shards, 31 samples
    shards = []
    for i, n in enumerate(sizes):
        path = tmp_path / f"s-{i:06d}.tar"
        write_tar(path, [f"s{i}_{j}" for j in range(n)])
        shards.append(Shard(str(path), n, "tar"))
    return shards


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_get_equal_disjoint_spans_covering_the_epoch(world):
    counts = [5, 1, 9, 3, 7, 2, 4]
    seen = Counter()
    per_rank = samples_per_rank(counts, world)
    for rank in range(world):
        pieces = rank_pieces(counts, seed=3, epoch=0, world=world, rank=rank)
        assert sum(p.stop - p.start for p in pieces) == per_rank
        for block in rank_blocks(counts, 3, 0, world, rank, shuffle_shards=2):
            for i in range(block.size):
                seen[block.sample_at(i)] += 1
    assert all(v == 1 for v in seen.values())
    assert len(seen) == per_rank * world == sum(counts) - sum(counts) % world


def test_plan_is_a_pure_function_and_changes_per_epoch():
    counts = [4, 4, 4, 4]
    order = lambda epoch: [tuple(map(int, b.sample_at(i))) for b in rank_blocks(counts, 1, epoch, 1, 0, 2) for i in range(b.size)]
    first = order(0)
    random.seed(12345)  # global random state moved: a pure plan must not see it
    np.random.seed(54321)
    assert order(0) == first
    # and another process (another hash seed) computes the same plan: what a resume on another node relies on
    code = ("from mocostream.pipeline.plan import rank_blocks; print([tuple(map(int, b.sample_at(i))) "
            "for b in rank_blocks([4, 4, 4, 4], 1, 0, 1, 0, 2) for i in range(b.size)])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONHASHSEED": "7"})
    assert r.returncode == 0 and r.stdout.strip() == str(first), r.stderr[-2000:]
    assert order(0) != order(1)
    assert sorted(order(0)) == sorted(order(1))


@pytest.mark.parametrize("world", [2, 3])
def test_stream_over_uneven_shards_balances_ranks(uneven_tars, world):
    streams = [SampleStream(uneven_tars, seed=0, world=world, rank=r, epochs=1) for r in range(world)]
    keys = [[it.sample.key for it in s] for s in streams]
    assert len({len(k) for k in keys}) == 1  # same count on every rank
    flat = [k for ks in keys for k in ks]
    assert len(flat) == len(set(flat)) == 31 - 31 % world
    assert streams[0].skipped["epoch_remainder"] == 31 % world


def test_resume_mid_epoch_continues_exactly(uneven_tars):
    full = [it.sample.key for it in SampleStream(uneven_tars, seed=5, world=1, rank=0, shuffle_shards=2, epochs=2)]
    first = SampleStream(uneven_tars, seed=5, world=1, rank=0, shuffle_shards=2, epochs=2)
    taken = []
    for it in first:
        taken.append(it.sample.key)
        first.mark_consumed(it)
        if len(taken) == 40:  # past the first epoch's end (31)
            break
    second = SampleStream(uneven_tars, seed=5, world=1, rank=0, shuffle_shards=2, epochs=2)
    second.load_state_dict(first.state_dict())
    rest = [it.sample.key for it in second]
    assert taken + rest == full


def test_truncated_tar_keeps_samples_before_the_cut(tmp_path):
    path = tmp_path / "t-000000.tar"
    write_tar(path, [f"k{j}" for j in range(10)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    stream = SampleStream([Shard(str(path), 10, "tar")], seed=0, world=1, rank=0, epochs=1)
    keys = [it.sample.key for it in stream]
    assert 0 < len(keys) < 10
    assert stream.skipped["missing_in_shard"] == 10 - len(keys)


def test_missing_shard_is_skipped_and_counted(tmp_path, uneven_tars):
    shards = uneven_tars + [Shard(str(tmp_path / "gone-000000.tar"), 6, "tar")]
    stream = SampleStream(shards, seed=0, world=1, rank=0, epochs=1)
    keys = [it.sample.key for it in stream]
    assert len(keys) == 31 and stream.skipped["shard_unreadable"] == 6


def test_parquet_shards_and_counts_without_manifest(tmp_path):
    for i in range(2):
        write_parquet(tmp_path / f"p-{i:06d}.parquet", [f"p{i}_{j}" for j in range(7)])
    storage = Storage()
    shards = with_counts(resolve_shards(str(tmp_path / "p-{000000..000001}.parquet"), storage=storage), storage=storage)
    assert [s.samples for s in shards] == [7, 7]
    keys = [it.sample.key for it in SampleStream(shards, seed=0, world=1, rank=0, epochs=1)]
    assert sorted(keys) == sorted(f"p{i}_{j}" for i in range(2) for j in range(7))


def test_folder_without_manifest_lists_shards(tmp_path, uneven_tars):
    shards = with_counts(resolve_shards(str(tmp_path), storage=Storage()), storage=Storage())
    assert len(shards) == 7 and sum(s.samples for s in shards) == 31


@pytest.mark.parametrize("spec", ["", "/nonexistent/folder", "/nonexistent/manifest.json", "x.zip"])
def test_bad_data_specs_are_user_errors(spec):
    with pytest.raises(DataSpecError):
        resolve_shards(spec, storage=Storage())


def test_fewer_samples_than_ranks_is_an_error(uneven_tars):
    with pytest.raises(DataSpecError):
        SampleStream(uneven_tars[1:2], seed=0, world=2, rank=0)


def _consume(stream, n):
    """Take n items as a trainer would, marking each consumed; returns their keys."""
    keys = []
    for it in stream:
        keys.append(it.sample.key)
        stream.mark_consumed(it)
        if len(keys) == n:
            break
    return keys


@pytest.mark.parametrize("worlds", [(2, 1, 3), (3, 2), (1, 4), (2, 3, 1)])
def test_elastic_resume_delivers_each_remaining_sample_once(uneven_tars, worlds):
    """Resize mid-epoch (e.g. 2 -> 1 -> 3 ranks): the union of what all ranks consume in the epoch is
    every sample once, except the few dropped to keep ranks equal, which are counted."""
    seen, states, dropped = [], None, 0
    for level, world in enumerate(worlds):
        streams = [SampleStream(uneven_tars, seed=11, world=world, rank=r, shuffle_shards=2, epochs=1)
                   for r in range(world)]
        for s in streams:
            if states is not None:
                s.load_states(states)
        last = level == len(worlds) - 1
        for s in streams:
            seen += _consume(s, 10**6 if last else 4)
        dropped += streams[0].skipped["epoch_remainder"]
        states = [s.state_dict() for s in streams]
    assert len(seen) == len(set(seen))  # nothing twice
    assert len(seen) + dropped == 31  # nothing lost silently


def test_elastic_resume_with_ranks_straddling_epochs(uneven_tars):
    """One rank already in epoch 1 when the job is resized: neither epoch repeats a sample."""
    streams = [SampleStream(uneven_tars, seed=2, world=2, rank=r, epochs=2) for r in range(2)]
    keys = {0: _consume(streams[0], 15 + 3), 1: _consume(streams[1], 5)}  # 15 per rank per epoch
    assert streams[0].epoch == 1 and streams[1].epoch == 0
    states = [s.state_dict() for s in streams]
    new = SampleStream(uneven_tars, seed=2, world=1, rank=0, epochs=2)
    new.load_states(states)
    rest = _consume(new, 10**6)
    epoch0 = keys[0][:15] + keys[1] + rest[: 30 - 15 - 5]
    epoch1 = keys[0][15:] + rest[30 - 15 - 5 :]
    assert len(epoch0) == len(set(epoch0)) == 30
    assert len(epoch1) == len(set(epoch1))
    assert len(epoch1) + new.skipped["epoch_remainder"] >= 30


def test_read_ahead_is_bounded_by_bytes(uneven_tars, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from mocostream.pipeline import stream as pipeline_stream

    submitted = []

    class CountingPool(ThreadPoolExecutor):
        """Records each shard load when it is handed to the read-ahead threads (in the consumer's thread,
        so the count is known when next() returns, however slowly the threads run)."""

        def submit(self, fn, /, *args, **kwargs):
            if getattr(fn, "__name__", "") == "_load_shard":
                submitted.append(args)
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(pipeline_stream, "ThreadPoolExecutor", CountingPool)
    sized = [Shard(s.url, s.samples, s.format, bytes=os.path.getsize(s.url)) for s in uneven_tars]
    stream = SampleStream(sized, seed=0, world=1, rank=0, shuffle_shards=1, read_ahead=4,
                          read_ahead_bytes=min(s.bytes for s in sized) - 1, epochs=1)
    it = iter(stream)
    next(it)
    assert len(submitted) == 2  # the block in use + the one always allowed; by count alone it would be 5
    assert len(list(it)) + 1 == 31  # the bound holds back nothing: every sample still comes


def test_unreadable_parquet_row_group_costs_only_its_rows(tmp_path):
    path = tmp_path / "p-000000.parquet"
    keys = [f"k{i}" for i in range(12)]
    pq.write_table(pa.table({"key": keys, "image": [bytes([i]) * 3000 for i in range(12)]}), path,
                   row_group_size=4, compression="none")
    data = bytearray(path.read_bytes())
    offset = pq.ParquetFile(path).metadata.row_group(1).column(1).data_page_offset
    data[offset : offset + 40] = b"\xff" * 40  # break the page header of row group 1's images
    path.write_bytes(bytes(data))
    stream = SampleStream([Shard(str(path), 12, "parquet")], seed=0, world=1, rank=0, epochs=1)
    got = sorted(it.sample.key for it in stream)
    assert got == sorted(keys[:4] + keys[8:])
    assert stream.skipped["unreadable_row_group"] == 4
