"""Preemption and resizing of a real multi-process job: exact resume (same keys, same losses) and
elastic resume (2 -> 1 -> 3 ranks) that delivers every sample of the epoch exactly once."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import cli, finish, tiny_flags, torchrun

pytestmark = pytest.mark.slow


def run(world: int, *args: str) -> None:
    if world == 1:
        r = cli("train", *args)
        assert r.returncode == 0, r.stderr[-3000:]
        return
    proc = torchrun("train", *args, nproc=world)
    out = finish(proc, 600)
    assert proc.returncode == 0, out[-3000:]


def read(path) -> list[str]:
    return path.read_text().split("\n")[:-1] if path.exists() else []


@pytest.mark.parametrize("backend", ["dali"])  # opencv: test_train's SIGTERM test (cut, --resume, whole, 2 ranks)
def test_preempted_and_resumed_run_matches_an_uninterrupted_one(labelled_shards, tmp_path, backend):
    def flags(name):
        return ["--data", labelled_shards, "--backend", backend, "--steps", "6", "--checkpoint-dir", str(tmp_path / name),
                "--trace-keys", str(tmp_path / name / "keys"), *tiny_flags()]

    (tmp_path / "whole").mkdir()
    (tmp_path / "cut").mkdir()
    run(2, *flags("whole"))
    run(2, *flags("cut"), "--stop-after", "3")  # preempted after 3 steps: checkpoint, exit 0
    assert len(read(tmp_path / "cut" / "keys.rank0")) == 24
    run(2, *flags("cut"), "--resume")
    for r in (0, 1):
        whole_keys = read(tmp_path / "whole" / f"keys.rank{r}")
        assert len(whole_keys) == 48
        assert read(tmp_path / "cut" / f"keys.rank{r}") == whole_keys
        # Same data, same augmentation, same RNG states: the same losses, step by step.
        assert read(tmp_path / "cut" / f"keys.rank{r}.loss") == read(tmp_path / "whole" / f"keys.rank{r}.loss")


def test_elastic_resume_2_1_3_ranks_consumes_each_sample_once(labelled_shards, tmp_path):
    """120 samples, batch 8 per rank: 2 ranks x 3 steps (48), 1 rank x 3 steps (24), 3 ranks x 2 steps (48)."""
    base = ["--data", labelled_shards, "--backend", "dali", "--steps", "50", "--checkpoint-dir", str(tmp_path / "ck"),
            *tiny_flags()]
    traces = []
    for i, (world, steps) in enumerate([(2, 3), (1, 3), (3, 2)]):
        trace = tmp_path / f"part{i}"
        run(world, *base, "--trace-keys", str(trace), "--stop-after", str(steps), *(["--resume"] if i else []))
        for r in range(world):
            keys = read(tmp_path / f"part{i}.rank{r}")
            assert len(keys) == steps * 8
            traces += keys
    assert len(traces) == len(set(traces)) == 120  # the whole epoch, each sample exactly once


def test_finite_epochs_on_uneven_damaged_shards_end_every_rank_together(imagenette_small, tmp_path):
    """7 uneven shards with broken images on 2 ranks and --epochs 1: the ranks run dry at different
    points, and still all stop at the same step with exit 0 (no rank left waiting at a collective)."""
    import json

    import webdataset as wds

    from mocostream.pipeline.plan import rank_pieces

    photos = sorted(imagenette_small.rglob("*.JPEG"))[:64]
    sizes, broken_shard, entries, i = [3, 20, 5, 11, 2, 15, 8], 1, [], 0  # every image of shard 1 is broken
    for s, n in enumerate(sizes):
        name = f"u-{s:06d}.tar"
        with wds.TarWriter(str(tmp_path / name)) as w:
            for j in range(n):
                w.write({"__key__": f"s{s}_{j}", "jpg": b"broken" if s == broken_shard else photos[i].read_bytes()})
                i += 1
        entries.append({"name": name, "samples": n})
    # What each rank can fill (seed 0, epoch 0): the ranks really do run dry at different steps.
    good = [sum(p.stop - p.start for p in rank_pieces(sizes, 0, 0, 2, r) if p.shard != broken_shard) for r in (0, 1)]
    assert good[0] // 8 != good[1] // 8
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": entries}))
    run(2, "--data", str(tmp_path / "manifest.json"), "--backend", "opencv", "--steps", "100", "--epochs", "1",
        "--checkpoint-dir", str(tmp_path / "ck"), "--trace-keys", str(tmp_path / "keys"), *tiny_flags())
    counts = [len(read(tmp_path / f"keys.rank{r}")) for r in (0, 1)]
    assert counts == [min(good) // 8 * 8] * 2
    assert (tmp_path / "ck" / f"checkpoint-{counts[0] // 8:08d}.pt").exists()


def test_resume_checks_seed_and_shard_list_and_accepts_appended_shards(labelled_shards, tmp_path):
    """--resume with another --seed or another --data is refused in one line; a list that only grew resumes."""
    import hashlib
    import json
    import shutil

    ck = ["--checkpoint-dir", str(tmp_path / "ck"), "--backend", "opencv", *tiny_flags()]
    run(1, "--data", labelled_shards, "--steps", "2", *ck)

    def refused(*args: str, says: str) -> None:
        r = cli("train", *args, "--steps", "3", "--resume", *ck)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert says in r.stderr.strip().splitlines()[-1]

    refused("--data", labelled_shards, "--seed", "1", says="--seed 0")
    manifest = json.loads((Path(labelled_shards) / "manifest.json").read_text())
    fewer = ",".join(f"{labelled_shards}/{s['name']}" for s in manifest["shards"][:-1])
    refused("--data", fewer, says=f"it had {len(manifest['shards'])} shards")

    grown = tmp_path / "grown"
    shutil.copytree(labelled_shards, grown)  # the same shards, one more appended (a stale manifest.parquet copied too)
    extra = grown / "extra-000000.tar"
    shutil.copy(grown / manifest["shards"][0]["name"], extra)
    data = extra.read_bytes()
    manifest["shards"].append({"name": extra.name, "samples": manifest["shards"][0]["samples"], "bytes": len(data),
                               "sha256": hashlib.sha256(data).hexdigest()})
    (grown / "manifest.json").write_text(json.dumps(manifest))
    r = cli("train", "--data", str(grown), "--steps", "3", "--resume", *ck)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the shard list grew from 5 to 6 shards: epoch 0 finishes on the old list" in r.stderr
