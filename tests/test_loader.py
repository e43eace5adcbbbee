"""The two-view loader on real photos: shapes, both backends, both shard formats, corrupt samples."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from mocostream.pipeline.filesystems import Storage
from mocostream.pipeline.loader import LoaderConfig, TwoViewLoader
from mocostream.pipeline.sources import Shard


def photos(folder, n):
    return sorted(p for p in folder.rglob("*.JPEG"))[:n]


@pytest.fixture(scope="module")
def damaged_shards(imagenette_small, tmp_path_factory):
    """Two tar shards and one parquet shard of real photos, with broken images mixed in."""
    root = tmp_path_factory.mktemp("damaged")
    files = photos(imagenette_small, 40)
    good = [(f"img{i:03d}", f.read_bytes()) for i, f in enumerate(files)]
    bad = [("bad_truncated", good[0][1][: len(good[0][1]) // 3]), ("bad_random", bytes(range(256)) * 20),
           ("bad_empty", b"")]
    samples = good[:17] + bad[:2] + good[17:30]
    tars = []
    for s, chunk in enumerate([samples[:16], samples[16:]]):
        path = root / f"t-{s:06d}.tar"
        with wds.TarWriter(str(path)) as w:
            for key, data in chunk:
                w.write({"__key__": key, "jpg": data})
        tars.append(Shard(str(path), len(chunk), "tar"))
    rows = good[30:] + [bad[1], bad[2]]
    path = root / "p-000000.parquet"
    pq.write_table(pa.table({"key": [k for k, _ in rows], "image": [d for _, d in rows]}), path, row_group_size=4)
    return {"tar": tars, "parquet": [Shard(str(path), len(rows), "parquet")], "bad": {k for k, _ in bad}}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "opencv"])
@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_batches_of_two_views_skip_and_count_bad_images(damaged_shards, backend, fmt):
    shards = damaged_shards[fmt]
    B, S = 4, 48
    loader = TwoViewLoader(LoaderConfig(data="", batch_size=B, image_size=S, backend=backend, workers=1,
                                        recipe="moco_v2", epochs=1), shards=shards)
    batches = list(loader)
    total = sum(s.samples for s in shards)
    keys = [k for b in batches for k in b.keys]
    assert all(b.q.shape == b.k.shape == (B, 3, S, S) and b.q.dtype == torch.float32 for b in batches)
    assert not set(keys) & damaged_shards["bad"]
    assert len(keys) == len(set(keys))
    skipped = sum(loader.skipped.values())
    assert skipped >= 2  # the broken images, each counted by reason
    # Nothing lost silently: every sample was delivered or counted as skipped, with its reason.
    assert len(keys) + skipped == total
    assert loader.skipped["partial_last_batch"] < B
    b = batches[0]
    assert not torch.equal(b.q, b.k)  # two independent views
    assert -3 < float(b.q.mean()) < 3 and 0.2 < float(b.q.std()) < 2  # ImageNet-normalised


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [4, 8])
def test_both_backends_count_skips_and_the_partial_batch_alike(damaged_shards, batch_size):
    """Skips, batch cuts and the partial last batch are one stage shared by both backends: on the same damaged
    shards DALI (bad images filtered before the chunk is cut) and OpenCV (bad images found by the workers, their
    batch completed from the next chunk) hand out the same batches, resume points and counts."""
    shards = damaged_shards["tar"]
    runs = {}
    for backend in ("dali", "opencv"):
        loader = TwoViewLoader(LoaderConfig(data="", batch_size=batch_size, image_size=32, backend=backend,
                                            workers=1, epochs=1, seed=7), shards=shards)
        batches = [(b.keys, b.last.epoch, b.last.position) for b in loader]
        runs[backend] = batches, dict(loader.skipped)
    assert runs["dali"] == runs["opencv"]
    batches, skipped = runs["opencv"]
    good = sum(s.samples for s in shards) - 2  # one truncated, one random-bytes image
    assert skipped == {"truncated": 1, "not_an_image": 1, "partial_last_batch": good % batch_size}
    assert len(batches) == good // batch_size and all(len(keys) == batch_size for keys, _, _ in batches)


def test_loader_resume_state_skips_consumed_batches(damaged_shards):
    cfg = LoaderConfig(data="", batch_size=4, image_size=32, backend="opencv", workers=0, epochs=1)
    full = [k for b in TwoViewLoader(cfg, shards=damaged_shards["tar"]) for k in b.keys]
    first = TwoViewLoader(cfg, shards=damaged_shards["tar"])
    it = iter(first)
    head = []
    for _ in range(3):
        b = next(it)
        first.consumed(b)
        head += b.keys
    next(it)  # fetched but never trained on: must come again after the resume
    state = first.state_dict()
    it.close()
    second = TwoViewLoader(cfg, shards=damaged_shards["tar"])
    second.load_state_dict(state)
    assert head + [k for b in second for k in b.keys] == full


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "opencv"])
def test_memory_stays_flat_over_20_passes(damaged_shards, backend):
    loader = TwoViewLoader(LoaderConfig(data="", batch_size=4, image_size=64, backend=backend, workers=1,
                                        epochs=20), shards=damaged_shards["tar"])
    rss = {}
    for b in loader:
        loader.consumed(b)
        rss[b.last.epoch] = _rss_bytes()
    assert sorted(rss) == list(range(20))
    warm = rss[3]
    assert max(rss[e] for e in range(3, 20)) < 1.10 * warm, {e: v >> 20 for e, v in rss.items()}


@pytest.mark.slow
def test_key_order_does_not_depend_on_worker_count(damaged_shards):
    orders = []
    for workers in (0, 1, 2):
        cfg = LoaderConfig(data="", batch_size=4, image_size=32, backend="opencv", workers=workers, epochs=1, seed=4)
        orders.append([k for b in TwoViewLoader(cfg, shards=damaged_shards["tar"]) for k in b.keys])
    dali = LoaderConfig(data="", batch_size=4, image_size=32, backend="dali", workers=2, epochs=1, seed=4)
    orders.append([k for b in TwoViewLoader(dali, shards=damaged_shards["tar"]) for k in b.keys])
    assert orders[0] and all(o == orders[0] for o in orders)


@pytest.mark.filterwarnings("ignore:Invalid APNG")  # PIL's note on apng_zero_frames
def test_files_only_dali_rejects_are_skipped_before_they_fail_a_batch(imagenette_small, tmp_path):
    """PIL decodes these crafted files, DALI's decoder fails on them. The pre-flight check asks nvImageCodec
    too, so each is skipped as `corrupt` on its own, instead of failing its whole batch (`decoder_error`)."""
    from helpers import crafted
    from mocostream.pipeline.image_check import check_image

    files = photos(imagenette_small, 12)
    bad = crafted(files[0].read_bytes())
    assert {name: check_image(data) for name, data in bad.items()} == {name: "corrupt" for name in bad}
    good = [(f"img{i:03d}", "jpg", f.read_bytes()) for i, f in enumerate(files)]
    samples = good[:3] + [(name.split(".")[0], name.split(".")[1], data) for name, data in bad.items()] + good[3:]
    path = tmp_path / "t-000000.tar"
    with wds.TarWriter(str(path)) as w:
        for key, ext, data in samples:
            w.write({"__key__": key, ext: data})
    loader = TwoViewLoader(LoaderConfig(data="", batch_size=4, image_size=32, backend="dali", workers=1,
                                        epochs=1), shards=[Shard(str(path), len(samples), "tar")])
    keys = [k for b in loader for k in b.keys]
    assert sorted(keys) == [k for k, _, _ in good]  # 12 good samples: three full batches, none lost
    assert loader.skipped == {"corrupt": len(bad)}


def test_dali_pre_flight_checks_run_ahead_off_the_training_thread(damaged_shards, monkeypatch):
    """The checks run on the loader's own threads (up to two batches ahead): the training thread only collects
    their answers, so decoding every image with PIL and nvImageCodec does not stall the step."""
    import threading

    import mocostream.pipeline.image_check as image_check

    real, threads = image_check.check_image, []

    def recorded(data):
        threads.append(threading.current_thread().name)
        return real(data)

    monkeypatch.setattr(image_check, "check_image", recorded)
    loader = TwoViewLoader(LoaderConfig(data="", batch_size=4, image_size=32, backend="dali", workers=2,
                                        epochs=1), shards=damaged_shards["tar"])
    batches = iter(loader)
    first = next(batches)
    assert len(first.keys) == 4
    assert threads and all(name.startswith("image-check") for name in threads)
    keys = list(first.keys) + [k for b in batches for k in b.keys]
    assert len(threads) == sum(s.samples for s in damaged_shards["tar"])  # every sample checked exactly once
    assert not set(keys) & damaged_shards["bad"]


# ---------------------------------------------------------------- pre-flight check and validated shards

def _recording_check(monkeypatch) -> list:
    import mocostream.pipeline.image_check as image_check

    real, calls = image_check.check_image, []

    def recorded(data):
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(image_check, "check_image", recorded)
    return calls


@pytest.fixture(scope="module")
def created_shards(imagenette_small, tmp_path_factory):
    """Shards made by `shards create`: its manifest says they were validated, and by which checker."""
    from mocostream.shards.create import create_shards

    out = tmp_path_factory.mktemp("created")
    create_shards([str(imagenette_small)], str(out), fmt="tar", samples_per_shard=40, progress=False, dedup="none")
    return out


@pytest.mark.parametrize("mode,checked", [("auto", False), ("always", True), ("never", False)])
def test_validated_shards_skip_the_pre_flight_check(created_shards, monkeypatch, mode, checked):
    from mocostream.pipeline.shard_table import load_shard_table

    table = load_shard_table(str(created_shards), storage=Storage())  # the columnar manifest carries the stamp too
    assert table.validated_by["check_version"] >= 1
    calls = _recording_check(monkeypatch)
    loader = TwoViewLoader(LoaderConfig(data=str(created_shards), batch_size=8, image_size=32, backend="dali",
                                        workers=1, epochs=1, preflight=mode))
    keys = [k for b in loader for k in b.keys]
    total = int(table.counts.sum())
    assert len(keys) + loader.skipped["partial_last_batch"] == total
    assert len(calls) == (total if checked else 0)


def test_foreign_or_stale_shards_keep_the_check(created_shards, monkeypatch):
    """Shards listed without a manifest, or whose stamp is from other rules or a larger pixel budget, are
    checked; `never` forces the check off for them too."""
    import dataclasses

    from mocostream.pipeline.image_check import CHECK_VERSION, MAX_PIXELS
    from mocostream.pipeline.loader import needs_preflight
    from mocostream.pipeline.shard_table import ShardTable
    from mocostream.pipeline.sources import resolve_shards

    shards = resolve_shards(str(created_shards / "manifest.json"), storage=Storage())  # the JSON manifest
    stamp = ShardTable.from_shards(shards).validated_by
    assert stamp == shards[0].validated_by and needs_preflight("auto", stamp) is False
    for bad in ({**stamp, "check_version": CHECK_VERSION + 1}, {**stamp, "max_pixels": MAX_PIXELS + 1},
                {**stamp, "decoder": "none (nvImageCodec not installed)"}, None, "yes"):
        assert needs_preflight("auto", bad)
    mixed = ShardTable.from_shards(shards[:1] + [dataclasses.replace(shards[1], validated_by=None)])
    assert mixed.validated_by is None and needs_preflight("auto", mixed.validated_by)
    assert needs_preflight("never", None) is False

    calls = _recording_check(monkeypatch)
    listed = ",".join(s.url for s in shards)  # the same tar files, named one by one: no manifest, no stamp
    loader = TwoViewLoader(LoaderConfig(data=listed, batch_size=8, image_size=32, backend="dali", workers=1,
                                        epochs=1))
    assert loader.preflight and len(list(loader)) > 0
    assert len(calls) == sum(s.samples for s in shards)
    with pytest.raises(ValueError, match="pre-flight"):
        TwoViewLoader(LoaderConfig(data=listed, preflight="sometimes"))


def test_a_bad_image_in_trusted_shards_costs_one_batch(damaged_shards):
    """Something that slips past validation still cannot stop the stream: its batch fails inside DALI, the
    pipeline is rebuilt and the batch's samples are counted as decoder_error."""
    import dataclasses

    from mocostream.pipeline.image_check import MAX_PIXELS, validation_stamp

    stamp = validation_stamp(MAX_PIXELS)
    shards = [dataclasses.replace(s, validated_by=stamp) for s in damaged_shards["tar"]]
    loader = TwoViewLoader(LoaderConfig(data="", batch_size=4, image_size=32, backend="dali", workers=1,
                                        epochs=1), shards=shards)
    assert not loader.preflight
    keys = [k for b in loader for k in b.keys]
    assert not set(keys) & damaged_shards["bad"]
    assert loader.skipped["decoder_error"] >= 4
    assert len(keys) + sum(loader.skipped.values()) == sum(s.samples for s in shards)
