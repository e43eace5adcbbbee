"""bench/curate_cifar.py: how a selection is scored with make_uncurated.py's truth, the targets it is judged by,
and its random arm (a selection manifest of a uniform random subset) on a real curated folder."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from helpers import REPO, SHARED_DATA, cli, need_archive

_spec = importlib.util.spec_from_file_location("curate_cifar", REPO / "bench" / "curate_cifar.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TOOL = SHARED_DATA.parent / "tools" / "make_uncurated.py"


def synthetic_truth(path: Path) -> list[dict]:
    """4 classes with 12, 6, 3 and 2 originals; o0 reposted 5 times, p0 3 times; 6 junk images. Written as
    truth.jsonl and read back, as the bench reads it."""
    records = []

    def add(file, kind, label, group=None):
        records.append({"file": file, "kind": kind, "label": label, "group": group or file,
                        "class": None if label < 0 else f"c{label}", "junk": "flat" if kind == "junk" else None})

    for label, (prefix, n) in enumerate((("o", 12), ("p", 6), ("q", 3), ("s", 2))):
        for i in range(n):
            add(f"{prefix}{i}.jpg", "original", label)
    for i in range(5):
        add(f"r0{i}.jpg", "repost", 0, "o0.jpg")
    for i in range(3):
        add(f"r1{i}.jpg", "repost", 1, "p0.jpg")
    for i in range(6):
        add(f"j{i}.jpg", "junk", -1)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_scoring_a_selection_with_the_truth(tmp_path):
    truth = synthetic_truth(tmp_path / "truth.jsonl")
    # 2 of o0's group of 6, only a repost of p0 (its content is kept), o1-o5, p1 p2, every q, s0, one junk
    kept = {"o0.jpg", "r00.jpg", "r10.jpg", *(f"o{i}.jpg" for i in range(1, 6)), "p1.jpg", "p2.jpg",
            "q0.jpg", "q1.jpg", "q2.jpg", "s0.jpg", "j0.jpg", "not-in-the-truth.jpg"}
    s = bench.score_selection(truth, kept)
    assert (s["images"], s["kept"], s["viral_groups"]) == (37, 15, 2)
    assert s["copies_per_viral_before"] == 5.0 and s["copies_per_viral"] == 1.5  # (6 + 4) / 2, (2 + 1) / 2
    assert s["junk_share_before"] == pytest.approx(6 / 37) and s["junk_share_after"] == pytest.approx(1 / 15)
    assert s["junk_cut"] == pytest.approx(90 / 37)
    assert s["class_ratio_before"] == 17 / 2 and s["class_ratio_after"] == 7 / 1  # originals + reposts per class
    assert s["rarest_classes"] == [3, 2, 1] and s["rarest_originals"] == {3: 2, 2: 3, 1: 6}
    assert s["rarest_kept_share_by_class"] == {3: 0.5, 2: 1.0, 1: 0.5}
    assert s["rarest_kept_share"] == pytest.approx(7 / 11)
    assert s["originals_lost_share"] == pytest.approx(10 / 23)  # o6-o11, p3-p5, s1

    # scored within a universe (the shard set it chose from): what is outside does not count
    universe = {r["file"] for r in truth} - {"j5.jpg", "o11.jpg", "r04.jpg"}
    s = bench.score_selection(truth, kept, universe)
    assert s["images"] == 34 and s["junk_share_before"] == pytest.approx(5 / 34)
    assert s["copies_per_viral_before"] == 4.5 and s["originals_lost_share"] == pytest.approx(9 / 22)

    # everything kept; nothing of a class kept; no junk kept
    s = bench.score_selection(truth, {r["file"] for r in truth})
    assert s["junk_cut"] == 1.0 and s["class_ratio_after"] == s["class_ratio_before"] and s["originals_lost_share"] == 0
    s = bench.score_selection(truth, {"o0.jpg", "p0.jpg", "q0.jpg"})
    assert s["class_ratio_after"] == float("inf") and s["junk_cut"] == float("inf") and s["rarest_kept_share"] == 2 / 11


def test_the_best_class_ratio_a_selection_of_a_size_can_reach(tmp_path):
    """Water-filling over the originals per class: small classes whole, the rest cut to a common cap."""
    per_class = Counter({"a": 50, "b": 100, "c": 1000, "d": 5000})
    assert bench.best_class_ratio(per_class, 1150) == 10.0  # a and b whole, c and d 500 each: 500 / 50
    assert bench.best_class_ratio(per_class, 150) == 1.0  # 37.5 of each: every class cut
    assert bench.best_class_ratio(per_class, 10 ** 6) == 100.0  # room for everything: the originals' own ratio
    assert bench.best_class_ratio(per_class, 0) == float("inf")
    truth = synthetic_truth(tmp_path / "truth.jsonl")  # originals 12, 6, 3, 2: 7 kept -> 2, 2, 2 and 1 whole
    assert bench.score_selection(truth, {f"o{i}.jpg" for i in range(7)})["best_class_ratio"] == pytest.approx(1.0)
    assert bench.score_selection(truth, {f"o{i}.jpg" for i in range(11)})["best_class_ratio"] == 1.5


def test_the_targets_pass_or_fail_and_are_open_without_runs(tmp_path):
    truth = synthetic_truth(tmp_path / "truth.jsonl")
    everything = bench.score_selection(truth, {r["file"] for r in truth})
    good = bench.score_selection(truth, {r["file"] for r in truth if r["kind"] == "original"} | {"r00.jpg"})
    top1 = {"curated": [0.5, 0.75], "raw": [0.5, 0.625], "random": [0.5], "perceptual": [0.625]}  # exact in binary
    rows = bench.judge({"curated": good, "raw": everything}, top1)
    verdict = {r["target"]: r["passed"] for r in rows}
    assert len(rows) == 7 and all(isinstance(r["goal"], str) for r in rows)
    # copies 1.5; junk gone; class max/min 13/2 > 17/2 / 3; rarest classes all kept
    assert [r["value"] for r in rows[:4]] == [1.5, float("inf"), 6.5, 1.0]
    assert [r["passed"] for r in rows[:4]] == [True, True, False, True]
    assert [r["value"] for r in rows[4:]] == [6.25, 12.5, 0.0]
    assert verdict["kNN top-1: curated - raw"] and verdict["kNN top-1: curated - random"]
    assert verdict["kNN top-1: curated - perceptual"] is False  # a tie is not "above"
    rows = bench.judge({"curated": everything}, {"curated": [0.5]})
    assert [r["passed"] for r in rows] == [False, False, False, True, None, None, None]


@pytest.mark.slow
def test_the_random_and_originals_arms_are_selections_and_the_join_finds_every_file(tmp_path):
    """A real collection, shards and `mocostream curate` (a random backbone: the selection is whatever it is);
    the random arm's manifest makes the stream read exactly the keys it lists, as many as curate kept."""
    from mocostream.pipeline.filesystems import Storage
    from mocostream.pipeline.readers import read_samples
    from mocostream.pipeline.selection import load_table
    from mocostream.pipeline.sources import resolve_shards

    archive = need_archive("cifar10-jpg.tar.gz")
    if not TOOL.exists():
        pytest.skip(f"{TOOL} not found")
    r = subprocess.run([sys.executable, str(TOOL), "--source", str(archive), "--out", str(tmp_path / "unc"),
                        "--per-class-max", "30", "--imbalance", "10"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    raw, cur = tmp_path / "raw", tmp_path / "cur"
    r = cli("shards", "create", str(tmp_path / "unc" / "images"), "--out", str(raw), "--shuffle", "--dedup", "none",
            "--reencode", "never", "--samples-per-shard", "25", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    weights = tmp_path / "backbone.pt"
    _random_backbone(weights)
    r = cli("curate", str(raw), "--embed-with", str(weights), "--arch", "resnet18_cifar_half", "--out", str(cur),
            "--keep-fraction", "0.5", "--dedup-eps", "0.001", "--workers", "0")
    assert r.returncode == 0, r.stderr[-3000:]

    truth = [json.loads(line) for line in (tmp_path / "unc" / "truth.jsonl").read_text().splitlines()]
    sources = bench.shard_sources(raw)
    assert sorted(sources.values()) == sorted(t["file"] for t in truth)
    n = bench.random_selection(cur, tmp_path / "rand", seed=0)
    curated = json.loads((cur / "report.json").read_text())["kept"]
    chosen = json.loads((tmp_path / "rand" / "keys.json").read_text())
    assert n == curated == len(chosen) == len(set(chosen)) and 0 < n < len(truth)
    storage = Storage()
    keys_of = {Path(s.url).name: [x.key for x in read_samples(s, Path(s.url).read_bytes())]
               for s in resolve_shards(str(raw), storage=storage)}
    table = load_table(str(tmp_path / "rand"), storage=storage)
    names = table.names.to_pylist() if hasattr(table.names, "to_pylist") else list(table.names)
    read = [keys_of[Path(names[i]).name][m] for i in range(len(table)) for m in table.kept.members(i, storage).tolist()]
    assert Counter(read) == Counter(chosen)
    assert bench.random_selection(cur, tmp_path / "rand2", seed=1) == n
    assert json.loads((tmp_path / "rand2" / "keys.json").read_text()) != chosen
    originals = bench.originals_selection(cur, tmp_path / "orig", sources, truth)  # the bound arm: the truth's pick
    picked = {sources[k] for k in json.loads((tmp_path / "orig" / "keys.json").read_text())}
    assert picked == {t["file"] for t in truth if t["kind"] == "original"} and originals == len(picked)


def _random_backbone(path: Path) -> None:
    import torch

    from mocostream.moco_core import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder("resnet18_cifar_half")(num_classes=1)
    torch.save({k: v for k, v in encoder.state_dict().items() if not k.startswith("fc.")}, path)
