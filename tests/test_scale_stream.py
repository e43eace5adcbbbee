"""The stream at scale, by simulation with the real stream code (only shard reads are stubbed with synthetic
samples): exactly-once over a chain of resizes on 100k shards, resume checks (seed, shard list, appended
shards), the columnar manifest, and aggregated skip warnings."""
from __future__ import annotations

import json
import logging
import pickle
from collections import Counter

import numpy as np
import pytest
import webdataset as wds

from mocostream.pipeline.filesystems import Storage
from mocostream.pipeline.plan import EpochPlan
from mocostream.pipeline.readers import Sample
from mocostream.pipeline.shard_table import ShardTable, load_shard_table
from mocostream.pipeline.skip_log import SkipLog
from mocostream.pipeline.sources import resolve_shards
from mocostream.pipeline.stream import ResumeMismatch, SampleStream


class SyntheticStream(SampleStream):
    """The real stream; a shard read returns synthetic samples "<shard>:<index>" instead of touching storage.
    Records the epoch_remainder counted for each epoch."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.drops: Counter = Counter()

    def _load_shard(self, index):
        return [Sample(f"{index}:{j}", b"") for j in range(int(self.counts[index]))]

    def _items(self, g, loaded, delivered):
        self.drops[g.epoch] += g.drop  # counted just before, by __iter__
        yield from super()._items(g, loaded, delivered)


def table(counts) -> ShardTable:
    return ShardTable("", [f"s-{i:06d}.tar" for i in range(len(counts))], counts)


def consume(stream, n, batch=16) -> list[tuple[int, str]]:
    """Take n items as the trainer does (marked consumed a batch at a time); (epoch, key) of each."""
    out, it = [], iter(stream)
    for item in it:
        out.append((item.epoch, item.sample.key))
        if len(out) % batch == 0 or len(out) == n:
            stream.mark_consumed(item)
        if len(out) == n:
            break
    it.close()
    return out


def run_chain(counts, stages, seed=7, epochs=2, appended=None):
    """stages: (world, items per rank: an int, or a function of rank and share length); the last stage
    reads to the end. Returns delivered (epoch, key) pairs, remainders per epoch and the checkpoints."""
    delivered, drops, state, states = [], Counter(), None, []
    for i, (world, take) in enumerate(stages):
        shards = table(appended if appended is not None and i else counts)
        streams = [SyntheticStream(shards, seed=seed, world=world, rank=r, epochs=epochs) for r in range(world)]
        for s in streams:
            if state is not None:
                s.load_states(state)
        for r, s in enumerate(streams):
            n = 10**9 if i == len(stages) - 1 else (take(r, s.share_length(s.epoch)) if callable(take) else take)
            delivered += consume(s, n)
            drops.update(s.drops)
        state = streams[0].checkpoint_state([s.position_state() for s in streams])
        states.append(state)
    return delivered, drops, states


def check_exactly_once(delivered, drops, totals):
    for epoch, total in enumerate(totals):
        keys = [k for e, k in delivered if e == epoch]
        assert len(keys) == len(set(keys)), f"epoch {epoch}: a sample delivered twice"
        assert len(keys) + drops[epoch] == total, f"epoch {epoch}: {total - len(keys) - drops[epoch]} lost silently"


@pytest.mark.slow
def test_exactly_once_over_100k_shards_and_a_chain_of_resizes():
    """8 -> 3 -> 64 (scale-up mid-epoch; half the ranks run into epoch 1) -> 5 ranks, which read to the end
    of epoch 1: each sample of each epoch delivered once or counted as epoch_remainder."""
    counts = np.random.default_rng(0).integers(1, 4, 100_000)
    total = int(counts.sum())
    stages = [(8, lambda r, share: share // 3 + r),
              (3, lambda r, share: share // 4 + 7 * r),
              (64, lambda r, share: share + 50 if r % 2 else share // 2),  # odd ranks cross the epoch boundary
              (5, None)]
    delivered, drops, states = run_chain(counts, stages)
    assert {e for e, _ in delivered} == {0, 1}
    assert sorted({e for e, _ in states[2]["ranks"]}) == [0, 1]  # the split across the epoch boundary happened
    check_exactly_once(delivered, drops, [total, total])
    assert max(len(pickle.dumps(s)) for s in states) < 100_000  # the state stays small


def test_scale_up_does_not_build_the_old_ranks_shares(monkeypatch):
    """A rank joining a larger world reads its blocks by index arithmetic: no whole level-0 share is listed."""
    counts = np.full(20_000, 5)
    built = Counter()
    original = EpochPlan.pieces
    monkeypatch.setattr(EpochPlan, "pieces", lambda self, r: (built.update([r]), original(self, r))[1])
    delivered, drops, _ = run_chain(counts, [(2, 1000), (16, 300), (3, None)], epochs=1)
    check_exactly_once(delivered, drops, [int(counts.sum())])
    assert not built


def test_resume_with_another_seed_is_refused():
    counts = [5] * 40
    _, _, states = run_chain(counts, [(2, 30), (2, 0)], epochs=1)
    stream = SyntheticStream(table(counts), seed=8, world=2, rank=0)
    with pytest.raises(ResumeMismatch, match="--seed 7"):
        stream.load_states(states[0])


@pytest.mark.parametrize("change, message", [
    (lambda c: c[:-1], "it had 40 shards, this --data has 39"),
    (lambda c: c[:10] + [6] + c[11:], "the same number of shards"),
    (lambda c: c[:10] + [6] + c[11:] + [3], "the first 40 shards differ"),
])
def test_resume_with_another_shard_list_is_refused(change, message):
    counts = [5] * 40
    _, _, states = run_chain(counts, [(2, 30), (2, 0)], epochs=1)
    stream = SyntheticStream(table(change(list(counts))), seed=7, world=3, rank=0)
    with pytest.raises(ResumeMismatch, match=message):
        stream.load_states(states[0])


@pytest.mark.parametrize("worlds", [(2, 2), (2, 3)])
def test_appended_shards_join_from_the_next_epoch(worlds, caplog):
    """The interrupted epoch finishes on the old list (exactly once); the new shards are read from the next."""
    old = [5, 3, 4, 6, 2, 5, 7, 1] * 5
    grown = old + [4] * 10
    caplog.set_level(logging.INFO, logger="mocostream.pipeline.stream")
    delivered, drops, _ = run_chain(old, [(worlds[0], 40), (worlds[1], None)], appended=grown)
    check_exactly_once(delivered, drops, [sum(old), sum(grown)])
    new_keys = {f"{i}:{j}" for i in range(len(old), len(grown)) for j in range(4)}
    assert not new_keys & {k for e, k in delivered if e == 0}
    assert new_keys - {k for e, k in delivered if e == 1} == set() or drops[1] > 0
    assert "the shard list grew from 40 to 50 shards: epoch 0 finishes on the old list" in caplog.text


def test_progress_is_constant_time_after_many_resizes():
    counts = np.random.default_rng(1).integers(1, 4, 5_000)
    stages = [(w, lambda r, share: share // 20 + r % 7) for w in (16, 48, 12, 128)]
    _, _, states = run_chain(counts, stages + [(128, 0)], epochs=1)
    assert len(states[-1]["layouts"][0]["pool"]) > 2 * 12  # the resizes left a fragmented pool
    stream = SyntheticStream(table(counts), seed=7, world=128, rank=5)
    stream.load_states(states[-1])
    stream.progress()
    cached = stream._share_lengths.copy()
    stream.progress()
    assert stream._share_lengths == cached and len(cached) == 1


def write_set(tmp_path, sizes):
    """A shard set made by the shard tool's manifest writer: manifest.parquet + manifest.json."""
    from mocostream.shards.manifest import build_manifest, file_digest, write_manifests
    from mocostream.shards.output import Destination

    entries = []
    for i, n in enumerate(sizes):
        path = tmp_path / f"shard-{i:06d}.tar"
        with wds.TarWriter(str(path)) as w:
            for j in range(n):
                w.write({"__key__": f"k{i}_{j}", "jpg": b"x"})
        size, sha = file_digest(str(path))
        entries.append({"name": path.name, "samples": n, "bytes": size, "sha256": sha})
    dest = Destination(str(tmp_path), storage=Storage())
    write_manifests(dest, {"tar": "manifest.json"}, {"tar": build_manifest("tar", {}, entries, [], 0.0)})
    dest.close()
    return entries


def test_columnar_manifest_matches_the_json_one(tmp_path):
    write_set(tmp_path, [3, 5, 2])
    assert (tmp_path / "manifest.parquet").exists()
    columnar = load_shard_table(str(tmp_path), storage=Storage())
    from_json = ShardTable.from_shards(resolve_shards(str(tmp_path / "manifest.json"), storage=Storage()))
    assert isinstance(columnar.names, type(columnar.names)) and not isinstance(columnar.names, list)
    assert [columnar[i] for i in range(3)] == [from_json[i] for i in range(3)]
    assert columnar.fingerprint() == from_json.fingerprint()
    stream = SampleStream(columnar, seed=0, world=1, rank=0, epochs=1)  # reads and checks bytes + sha256
    assert sorted(it.sample.key for it in stream) == sorted(f"k{i}_{j}" for i, n in enumerate([3, 5, 2]) for j in range(n))


def test_a_rewritten_json_manifest_wins_over_its_stale_columnar_twin(tmp_path, caplog):
    write_set(tmp_path, [3, 5, 2])
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["shards"] = m["shards"][:2]
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    assert len(load_shard_table(str(tmp_path), storage=Storage())) == 2
    assert "does not match" in caplog.text


def test_a_shard_list_without_manifest_is_counted_by_one_rank(tmp_path):
    write_set(tmp_path, [3, 5, 2])
    for name in ("manifest.json", "manifest.parquet"):
        (tmp_path / name).unlink()
    calls = []
    shared = load_shard_table(str(tmp_path), storage=Storage(), share=lambda compute: (calls.append(1), compute())[1])
    assert calls == [1] and list(shared.counts) == [3, 5, 2]


def test_skip_warnings_are_aggregated_per_reason_and_interval(caplog):
    now = [0.0]
    skips = SkipLog(logging.getLogger("skiptest"), interval=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="skiptest"):
        for i in range(1000):
            now[0] = i * 0.1  # 100 s of skips
            skips.note("corrupt" if i % 3 else "truncated", f"key{i}")
        skips.flush()
    lines = caplog.messages
    assert len(lines) == 2 + 2 + 2  # the first of each reason, then one line per reason per interval
    assert lines[1].endswith("(corrupt): key1 (further ones are logged every 60 s)")
    assert "corrupt): 399 in the last 60 s, e.g. key2, key4, key5" in lines[2]


def test_next_epochs_plan_is_made_on_the_planning_thread_while_this_one_is_read():
    counts = [5] * 40
    stream = SyntheticStream(table(counts), seed=3, world=2, rank=1, epochs=3)
    consume(stream, 3)
    pending = stream._plans[(1, 40, 2)]  # submitted when epoch 0 started, long before it ends
    plan = pending.result()
    assert plan.epoch == 1 and len(plan.order) == 40 and plan.ends.nbytes == 40 * 8  # arrays: O(shards)
