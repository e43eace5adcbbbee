"""`mocostream curate` on a small real uncurated collection (CIFAR-10 images through ../shared/tools/
make_uncurated.py, plus planted byte-identical copies): embed exactly once and resumable, the tree, dedup and
balanced sampling, selection.parquet, and training on the selection (exact, elastic and checked resume)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import REPO, SHARED_DATA, cli, finish, need_archive, tiny_flags, torchrun
from mocostream.curate.balance import balanced_quotas, waterfill
from mocostream.curate.dedup import greedy_dedup
from mocostream.curate.layout import CurateError
from mocostream.curate.levels import level_sizes, parse_levels

TOOL = SHARED_DATA.parent / "tools" / "make_uncurated.py"
PLANTED, COPIES = 4, 2  # originals copied byte for byte, copies of each
ARCH = "resnet18_cifar_half"


# ---- the collection, its embeddings and a selection (built once) -------------------------------------------
@pytest.fixture(scope="session")
def collection(tmp_path_factory) -> dict:
    """~250 images (long tail, reposts, junk) in 7 tar shards, with planted copies named after their original."""
    archive = need_archive("cifar10-jpg.tar.gz")
    if not TOOL.exists():
        pytest.skip(f"{TOOL} not found")
    root = tmp_path_factory.mktemp("uncurated")
    r = subprocess.run([sys.executable, str(TOOL), "--source", str(archive), "--out", str(root / "unc"),
                        "--per-class-max", "30", "--imbalance", "10", "--junk-templates", "8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    images = root / "unc" / "images"
    truth = [json.loads(line) for line in (root / "unc" / "truth.jsonl").read_text().splitlines()]
    originals = sorted(t["file"] for t in truth if t["kind"] == "original")[:: 17][:PLANTED]
    for name in originals:
        for k in range(COPIES):
            shutil.copy(images / name, images / f"zz_copy_{name[:-4]}_{k}.jpg")
    shards = root / "shards"
    r = cli("shards", "create", str(images), "--out", str(shards), "--samples-per-shard", "40", "--dedup", "none",
            "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    weights = root / "backbone.pt"
    _save_random_backbone(weights)
    groups = {name[:-4]: [f"zz_copy_{name[:-4]}_{k}" for k in range(COPIES)] for name in originals}
    return {"shards": shards, "weights": weights, "groups": groups, "root": root}


def _save_random_backbone(path: Path) -> None:
    """A randomly initialised backbone as a plain torchvision-style state_dict (no arch in it: --arch needed)."""
    import torch

    from mocostream.moco_core import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder(ARCH)(num_classes=1)
    torch.save({k: v for k, v in encoder.state_dict().items() if not k.startswith("fc.")}, path)


def embed_here(data: Path, out: Path, weights: Path, arch: str | None = ARCH, workers: int = 0) -> dict:
    """The embed stage in this process (decode in-process: no worker start-up)."""
    import torch

    from mocostream.curate.embed import EmbedConfig, embed
    from mocostream.ops.weights import load_frozen_backbone
    from mocostream.pipeline.filesystems import Storage

    backbone, info = load_frozen_backbone(str(weights), arch, storage=Storage())
    return embed(EmbedConfig(str(data), str(out), 32, 64, workers), backbone, info, torch.device("cpu"),
                 storage=Storage())


@pytest.fixture(scope="session")
def embedded(collection, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("curated") / "dest"
    embed_here(collection["shards"], out, collection["weights"])
    return out


def clustered_copy(embedded: Path, dest: Path, levels=(8, 3)) -> Path:
    from mocostream.curate.cluster import ClusterConfig, cluster
    from mocostream.pipeline.filesystems import Storage

    shutil.copytree(embedded, dest)
    cluster(ClusterConfig(str(dest), list(levels)), storage=Storage())
    return dest


def select_here(dest: Path, **kw) -> dict:
    from mocostream.curate.select import SelectConfig, select
    from mocostream.pipeline.filesystems import Storage

    return select(SelectConfig(str(dest), **{"dedup_eps": 1e-4, **kw}), storage=Storage())


@pytest.fixture(scope="session")
def selected(embedded, tmp_path_factory) -> Path:
    dest = clustered_copy(embedded, tmp_path_factory.mktemp("selected") / "dest")
    select_here(dest, target_size=60)
    return dest


def all_keys(shards: Path) -> list[str]:
    from mocostream.pipeline.filesystems import Storage
    from mocostream.pipeline.readers import read_samples
    from mocostream.pipeline.sources import resolve_shards

    return [s.key for shard in resolve_shards(str(shards), storage=Storage())
            for s in read_samples(shard, Path(shard.url).read_bytes())]


def selection(dest: Path) -> dict:
    return pq.read_table(dest / "selection.parquet").to_pydict()


def kept_keys(dest: Path) -> set[str]:
    sel = selection(dest)
    return {k for k, kept in zip(sel["key"], sel["kept"]) if kept}


# ---- the pure parts ------------------------------------------------------------------------------------------
def test_level_rule_and_levels_flag():
    assert level_sizes(1_000_000_000, 1_000_000) == [100_000, 10_000, 1_000, 100]  # capped by the fit sample
    assert level_sizes(250, 250) == [2]
    assert level_sizes(50_000, 50_000, cluster_size=100, level_ratio=5) == [500, 100, 20, 4]
    assert parse_levels("100, 10,2") == [100, 10, 2]
    for bad in ("10,100", "0", "a,b", ""):
        with pytest.raises(CurateError):
            parse_levels(bad)


def test_waterfill_gives_small_clusters_all_and_splits_the_rest_evenly():
    quota = waterfill([1, 5, 100, 3, 50], [0] * 5, [30])
    assert quota.sum() == 30 and list(quota[[0, 1, 3]]) == [1, 5, 3] and sorted(quota[[2, 4]]) == [10, 11]
    assert list(waterfill([4, 2], [0, 0], [100])) == [4, 2]  # a budget over the total keeps everything


def test_balanced_sampling_top_down_on_a_synthetic_tree():
    """Two coarse clusters: one holding a storm (1000 + 1000), one the long tail (5, 5, 2, 1). Budget 40: the
    tail's parent is below its share and keeps all 13; the storm's parent gets the other 27, split evenly."""
    sizes0 = np.array([1000, 1000, 5, 5, 2, 1])
    parents = [np.array([0, 0, 1, 1, 1, 1])]
    quota = balanced_quotas(sizes0, parents, 40, seed=3)
    assert quota.sum() == 40 and list(quota[2:]) == [5, 5, 2, 1] and sorted(quota[:2]) == [13, 14]
    assert list(balanced_quotas(sizes0, parents, 40, seed=3)) == list(quota)  # a pure function of the seed
    # three levels, and a budget below the number of clusters: at most one each, spread over the coarse level
    sizes0 = np.array([9, 9, 9, 9, 1, 1, 1, 1])
    parents = [np.array([0, 0, 1, 1, 2, 2, 3, 3]), np.array([0, 0, 1, 1])]
    quota = balanced_quotas(sizes0, parents, 2, seed=0)
    assert quota.sum() == 2 and quota.max() == 1
    assert quota[:4].sum() == 1 and quota[4:].sum() == 1  # one under each top cluster
    assert balanced_quotas(sizes0, parents, 10**6).tolist() == sizes0.tolist()


def test_greedy_dedup_keeps_the_first_of_each_group():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((5, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    x = np.concatenate([base, base[[1, 3, 1]] + 1e-4]).astype(np.float32)  # rows 5, 6, 7 copy rows 1, 3, 1
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dup = greedy_dedup(x, 1 - 1e-3)
    assert dup.tolist() == [-1, -1, -1, -1, -1, 1, 3, 1]
    assert greedy_dedup(x, 1.0).tolist() == [-1] * 8  # nothing is more similar than identical


def relu_like_dest(dest: Path, n: int = 240, dim: int = 64, copies: tuple = ((3, 100), (50, 200), (120, 230))) -> dict:
    """A DEST with embeddings/ written here (what embed writes) for n non-negative vectors sharing a large common
    component, as pooled post-ReLU features do; row b of each (a, b) in `copies` is a near-copy of row a."""
    import pyarrow as pa

    from mocostream.curate.kmeans import normalised
    from mocostream.curate.tables import embedding_table

    rng = np.random.default_rng(5)
    x = 3.0 + np.abs(rng.standard_normal((n, dim))).astype(np.float32)  # raw cosines ~0.97 between any two
    for a, b in copies:
        x[b] = x[a] + 1e-3 * rng.standard_normal(dim)
    x = normalised(x)
    (dest / "embeddings").mkdir(parents=True)
    stems, rows = ["part-0", "part-1"], [n // 2, n - n // 2]
    for s, (stem, lo) in enumerate(zip(stems, (0, n // 2))):
        keys = [f"k{i:04d}" for i in range(lo, lo + rows[s])]
        pq.write_table(embedding_table(keys, f"{stem}.tar", np.arange(rows[s], dtype=np.int32), x[lo:lo + rows[s]],
                                       {"samples": rows[s], "skipped": 0}), dest / "embeddings" / f"{stem}.parquet")
    meta = {"data": "synthetic", "data_shards": 2, "data_fingerprint": "synthetic"}
    index = pa.table({"shard": [0, 1], "name": [f"{s}.tar" for s in stems], "stem": stems, "rows": rows,
                      "samples": rows, "skipped": [0, 0]})
    pq.write_table(index.replace_schema_metadata({"mocostream_curate": json.dumps(meta)}),
                   dest / "embeddings" / "_index.parquet")
    return {"vectors": x, "copies": {f"k{b:04d}": f"k{a:04d}" for a, b in copies}}


def test_select_dedups_on_centred_vectors_so_shared_relu_components_are_not_duplicates(tmp_path):
    """Non-negative vectors with a large common component: on raw cosines every one is a duplicate of the first
    at eps 0.05; the select stage compares them centred on the fit sample's mean (clusters/mean.npy),
    so only the planted near-copies are duplicates."""
    from mocostream.curate.cluster import ClusterConfig, cluster
    from mocostream.pipeline.filesystems import Storage

    made = relu_like_dest(tmp_path / "dest")
    x = made["vectors"]
    assert (greedy_dedup(x, 0.95) >= 0).sum() == len(x) - 1  # raw cosines: all "duplicates" of row 0
    cluster(ClusterConfig(str(tmp_path / "dest"), [2]), storage=Storage())
    mean = np.load(tmp_path / "dest" / "clusters" / "mean.npy")
    assert mean.shape == (x.shape[1],) and np.allclose(mean, x.astype(np.float16).astype(np.float32).mean(0), atol=1e-4)
    tree = json.loads((tmp_path / "dest" / "clusters" / "tree.json").read_text())
    assert tree["centre"]["file"] == "clusters/mean.npy"
    assert tree["centre"]["norm"] == pytest.approx(float(np.linalg.norm(mean)), abs=1e-5)
    report = select_here(tmp_path / "dest", dedup_eps=0.05)
    sel = selection(tmp_path / "dest")
    dups = {k: d for k, d in zip(sel["key"], sel["dup_of"]) if d is not None}
    assert dups == made["copies"] and report["dropped"]["duplicate"] == len(made["copies"])
    assert report["kept"] == len(x) - len(made["copies"])


def test_a_dest_clustered_without_a_mean_is_refused_with_one_line_saying_rerun_cluster(tmp_path):
    from mocostream.curate.cluster import ClusterConfig, cluster
    from mocostream.pipeline.filesystems import Storage

    relu_like_dest(tmp_path / "dest")
    cluster(ClusterConfig(str(tmp_path / "dest"), [2]), storage=Storage())
    (tmp_path / "dest" / "clusters" / "mean.npy").unlink()  # as a DEST clustered before centring looks
    with pytest.raises(CurateError, match="rerun `mocostream curate cluster"):
        select_here(tmp_path / "dest")
    with pytest.raises(CurateError, match="rerun `mocostream curate cluster"):
        cluster(ClusterConfig(str(tmp_path / "dest"), [2]), storage=Storage())
    assert not (tmp_path / "dest" / ".select-work").exists() and not (tmp_path / "dest" / "selection.parquet").exists()
    r = cli("curate", "select", "--out", str(tmp_path / "dest"))
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "DEST/clusters was made on uncentred vectors" in err[0], r.stderr


# ---- embed -------------------------------------------------------------------------------------------------
def test_the_embedder_may_be_a_checkpoint_folder_its_latest_checkpoint_is_used(tmp_path):
    """--embed-with DIR (what `train --checkpoint-dir` leaves): the newest checkpoint's query backbone."""
    import torch

    from mocostream.moco_core import build_encoder
    from mocostream.ops.weights import load_frozen_backbone
    from mocostream.pipeline.filesystems import Storage

    folder = tmp_path / "ckpt"
    folder.mkdir()
    for step in (2, 10):  # 10 sorts after 2 by step, before it by name
        torch.manual_seed(step)
        state = build_encoder(ARCH)(num_classes=1).state_dict()
        torch.save({"model": {f"encoder_q.{k}": v for k, v in state.items()}, "config": {"arch": ARCH}},
                   folder / f"checkpoint-{step:08d}.pt")
    backbone, info = load_frozen_backbone(str(folder), None, storage=Storage())
    assert info["arch"] == ARCH and info["file"].endswith("checkpoint-00000010.pt")
    weights = [v for k, v in state.items() if not k.startswith("fc.") and v.is_floating_point()]
    assert len(weights) > 10
    loaded = [v for v in backbone.state_dict().values() if v.is_floating_point()]
    assert all(torch.equal(a, b) for a, b in zip(loaded, weights, strict=True))
    with pytest.raises(ValueError, match="no checkpoint in"):
        load_frozen_backbone(str(tmp_path), None, storage=Storage())


def test_embed_writes_every_sample_once_with_its_member_index(collection, embedded, tmp_path):
    from mocostream.pipeline.filesystems import Storage
    from mocostream.pipeline.readers import read_samples
    from mocostream.pipeline.sources import resolve_shards

    keys = []
    for shard in resolve_shards(str(collection["shards"]), storage=Storage()):
        t = pq.read_table(embedded / "embeddings" / (Path(shard.url).stem + ".parquet"))
        samples = list(read_samples(shard, Path(shard.url).read_bytes()))
        assert [samples[m].key for m in t.column("member").to_pylist()] == t.column("key").to_pylist()
        assert set(t.column("shard").to_pylist()) == {Path(shard.url).name}
        vectors = np.array(t.column("vector").to_pylist(), np.float32)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=2e-3)
        keys += t.column("key").to_pylist()
    assert sorted(keys) == sorted(all_keys(collection["shards"])) and len(set(keys)) == len(keys)
    index = pq.read_table(embedded / "embeddings" / "_index.parquet").to_pydict()
    assert sum(index["rows"]) == len(keys) and index["skipped"] == [0] * len(index["rows"])
    # a rerun has nothing to do; another backbone into the same DEST is refused
    before = {p.name: p.stat().st_mtime_ns for p in (embedded / "embeddings").glob("shard-*.parquet")}
    assert embed_here(collection["shards"], embedded, collection["weights"])["shards"] == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (embedded / "embeddings").glob("shard-*.parquet")}
    other = tmp_path / "other.pt"
    shutil.copy(collection["weights"], other)
    with pytest.raises(CurateError, match="another backbone"):
        embed_here(collection["shards"], embedded, other, arch="resnet18_cifar_small")


@pytest.mark.slow
def test_embed_resumes_after_kill_9_and_embeds_each_sample_once(collection, tmp_path):
    """A run killed (-9) after its first shard file; the rerun keeps that file and does the rest."""
    out = tmp_path / "dest"
    args = [sys.executable, "-m", "mocostream.ops.cli", "curate", "embed", str(collection["shards"]), "--embed-with",
            str(collection["weights"]), "--arch", ARCH, "--out", str(out), "--workers", "1", "--batch-size", "8"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        while not list((out / "embeddings").glob("shard-*.parquet")):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    first = {p.name: p.stat().st_ino for p in (out / "embeddings").glob("shard-*.parquet")}
    shards = len(list(collection["shards"].glob("*.tar")))
    assert 1 <= len(first) < shards and not (out / "embeddings" / "_index.parquet").exists()
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["shards"] == shards - len(first)
    after = {p.name: p.stat().st_ino for p in (out / "embeddings").glob("shard-*.parquet")}
    assert len(after) == shards and all(after[n] == ino for n, ino in first.items())  # not rewritten
    keys = [k for p in sorted((out / "embeddings").glob("shard-*.parquet")) for k in pq.read_table(p)["key"].to_pylist()]
    assert sorted(keys) == sorted(all_keys(collection["shards"]))


@pytest.mark.slow
def test_embed_on_two_ranks_splits_the_shards(collection, embedded, tmp_path):
    out = tmp_path / "dest"
    proc = torchrun("curate", "embed", str(collection["shards"]), "--embed-with", str(collection["weights"]),
                    "--arch", ARCH, "--out", str(out), "--workers", "0", "--batch-size", "16", nproc=2)
    log = finish(proc, 600)
    assert proc.returncode == 0, log[-3000:]
    for p in sorted((embedded / "embeddings").glob("shard-*.parquet")):
        mine, one_rank = pq.read_table(out / "embeddings" / p.name), pq.read_table(p)
        assert mine["key"].to_pylist() == one_rank["key"].to_pylist()
        assert np.allclose(np.array(mine["vector"].to_pylist(), np.float32),
                           np.array(one_rank["vector"].to_pylist(), np.float32), atol=2e-3)
    assert pq.read_table(out / "embeddings" / "_index.parquet").num_rows == len(list(embedded.glob("embeddings/shard-*")))


# ---- cluster and select ------------------------------------------------------------------------------------
def test_cluster_levels_assignments_and_a_refit_with_other_options(embedded, tmp_path):
    from mocostream.curate.cluster import ClusterConfig, cluster
    from mocostream.pipeline.filesystems import Storage

    dest = clustered_copy(embedded, tmp_path / "dest", levels=(8, 3))
    tree = json.loads((dest / "clusters" / "tree.json").read_text())
    assert tree["levels"] == [8, 3] and len(tree["parents"]) == 1 and len(tree["parents"][0]) == 8
    assert set(tree["parents"][0]) <= {0, 1, 2}
    for level, k in enumerate(tree["levels"]):
        c = np.load(dest / "clusters" / f"centroids_level{level}.npy")
        assert c.shape == (k, 256) and c.dtype == np.float32
    sizes = np.zeros(8, int)
    for p in sorted((dest / "embeddings").glob("shard-*.parquet")):
        a = np.load(dest / "clusters" / "assign" / (p.stem + ".npy"))
        assert len(a) == pq.read_metadata(p).num_rows and a.min() >= 0 and a.max() < 8
        sizes += np.bincount(a, minlength=8)
    assert sizes.sum() == sum(pq.read_table(dest / "embeddings" / "_index.parquet")["rows"].to_pylist())
    assert (sizes > 0).sum() >= 4  # the vectors spread over the clusters
    with pytest.raises(CurateError, match="other options"):
        cluster(ClusterConfig(str(dest), [6, 2]), storage=Storage())
    assert cluster(ClusterConfig(str(dest), [8, 3]), storage=Storage())["assigned"] == 0  # done already


def test_selection_has_every_row_drops_planted_copies_and_meets_the_target(collection, embedded, selected):
    sel = selection(selected)
    index = pq.read_table(embedded / "embeddings" / "_index.parquet").to_pydict()
    assert len(sel["key"]) == sum(index["rows"]) == len(set(sel["key"]))
    assert sum(sel["kept"]) == 60
    assert Counter(sel["reason"])["kept"] == 60 and set(sel["reason"]) <= {"kept", "duplicate", "balanced_out"}
    for key, kept, reason, dup in zip(sel["key"], sel["kept"], sel["reason"], sel["dup_of"]):
        assert kept == (reason == "kept") and (dup is not None) == (reason == "duplicate")
    row = {k: i for i, k in enumerate(sel["key"])}
    for original, copies in collection["groups"].items():  # one kept per group: the first in data order
        assert sel["reason"][row[original]] != "duplicate"
        assert [sel["dup_of"][row[c]] for c in copies] == [original] * COPIES
    tree = json.loads((selected / "clusters" / "tree.json").read_text())
    assert [tree["parents"][0][c] for c in sel["cluster_0"]] == sel["cluster_1"]
    report = json.loads((selected / "report.json").read_text())
    assert report["inputs"] == len(sel["key"]) and report["kept"] == 60
    assert report["dropped"]["duplicate"] == Counter(sel["reason"])["duplicate"] >= PLANTED * COPIES
    assert sum(report["cluster_sizes_after"]) == 60 and sum(report["cluster_sizes_before"]) == report["inputs"]
    page = (selected / "report.html").read_text()  # the page a person opens, its thumbnails from the shards
    assert page.count('src="data:image/jpeg;base64,') >= 24 and "no thumbnail" not in page


def test_select_is_deterministic_and_the_same_through_many_buckets(embedded, selected, tmp_path):
    dest = clustered_copy(embedded, tmp_path / "dest")
    report = select_here(dest, target_size=60, select_memory=1 << 16)  # ~560 bytes a row: several buckets
    assert report["buckets"] > 1
    a, b = selection(selected), selection(dest)
    order = {k: i for i, k in enumerate(b["key"])}
    assert {k: b["reason"][order[k]] for k in a["key"]} == dict(zip(a["key"], a["reason"]))
    assert report["fingerprint"] == json.loads((selected / "report.json").read_text())["fingerprint"]
    assert not (dest / ".select-work").exists()


def _same_selection(a: dict, b: dict) -> None:
    """The same decision for every sample (row order follows the buckets, which follow --select-memory)."""
    def rows(t: dict) -> dict:
        return {k: (kept, r, d) for k, kept, r, d in zip(t["key"], t["kept"], t["reason"], t["dup_of"])}

    assert len(a["key"]) == len(b["key"]) and rows(a) == rows(b)


@pytest.mark.slow
def test_select_on_two_ranks_is_the_selection_of_one(embedded, selected, tmp_path):
    """torchrun, 2 ranks, several buckets: each rank buckets its shards and decides its buckets; the outputs are
    the one-process selection's, and the shared work folder is gone."""
    dest = clustered_copy(embedded, tmp_path / "dest")
    proc = torchrun("curate", "select", "--out", str(dest), "--target-size", "60", "--dedup-eps", "1e-4",
                    "--select-memory", "65536", nproc=2)
    log = finish(proc, 600)
    assert proc.returncode == 0, log[-3000:]
    report = json.loads((dest / "report.json").read_text())
    assert report["buckets"] >= 2  # each rank had a bucket to decide
    _same_selection(selection(selected), selection(dest))
    assert report["fingerprint"] == json.loads((selected / "report.json").read_text())["fingerprint"]
    assert (dest / "kept" / "shards.parquet").read_bytes() == (selected / "kept" / "shards.parquet").read_bytes()
    assert not (dest / ".select-work").exists()


@pytest.mark.slow
def test_select_on_two_ranks_into_object_storage_shares_its_work_there(embedded, selected, s3_server, tmp_path):
    """A remote DEST on 2 ranks: the work files go through the S3 server (SeaweedFS), the selection is the
    one-process one, and no file is left under DEST/.select-work/."""
    local = clustered_copy(embedded, tmp_path / "dest")
    fs, bucket = s3_server.filesystem(), s3_server.make_bucket("select")
    fs.put(str(local) + "/", f"{bucket}/dest/", recursive=True)
    proc = torchrun("curate", "select", "--out", f"s3://{bucket}/dest", "--target-size", "60", "--dedup-eps",
                    "1e-4", "--select-memory", "65536", "--storage-retries", "1", env=s3_server.env, nproc=2)
    log = finish(proc, 600)
    assert proc.returncode == 0, log[-3000:]
    fs.invalidate_cache()
    got = pq.read_table(fs.open(f"{bucket}/dest/selection.parquet")).to_pydict()
    _same_selection(selection(selected), got)
    assert json.loads(fs.cat(f"{bucket}/dest/report.json"))["fingerprint"] == \
        json.loads((selected / "report.json").read_text())["fingerprint"]
    assert fs.exists(f"{bucket}/dest/manifest.json")
    work = f"{bucket}/dest/.select-work"
    assert [p for p in fs.find(work) if p != work] == []  # no file left (SeaweedFS may keep the folder's entry)


def test_balanced_sampling_cuts_large_clusters_and_keeps_small_ones(selected):
    report = json.loads((selected / "report.json").read_text())
    before, after = np.array(report["cluster_sizes_before"]), np.array(report["cluster_sizes_after"])
    assert after.max() - after[after > 0].min() < before.max() - before[before > 0].min()
    small = before <= np.sort(before)[len(before) // 4]
    assert after[small].sum() >= 0.5 * before[small].sum()  # the smallest clusters keep most of what they have


# ---- training on the selection ---------------------------------------------------------------------------
def stream_keys(table, world: int, rank: int, state=None, take: int | None = None):
    from mocostream.pipeline.stream import SampleStream

    s = SampleStream(table, seed=0, world=world, rank=rank, epochs=1)
    if state is not None:
        s.load_states(state)
    keys = []
    for item in s:
        keys.append(item.sample.key)
        s.mark_consumed(item)
        if take is not None and len(keys) == take:
            break
    return keys, s


def test_the_stream_reads_exactly_the_kept_samples_and_resumes_elastically(selected):
    from mocostream.pipeline.filesystems import Storage
    from mocostream.pipeline.selection import load_table

    table = load_table(str(selected), storage=Storage())
    assert int(table.counts.sum()) == 60
    keys, _ = stream_keys(table, 1, 0)
    assert sorted(keys) == sorted(kept_keys(selected))
    # 2 ranks take 10 each, then 3 ranks finish the epoch: every kept sample once (40 left: 1 dropped)
    parts = [stream_keys(table, 2, r, take=10) for r in range(2)]
    state = parts[0][1].checkpoint_state([p[1].position_state() for p in parts])
    rest = [stream_keys(table, 3, r, state=state) for r in range(3)]
    seen = [k for p in parts for k in p[0]] + [k for r in rest for k in r[0]]
    assert len(seen) == len(set(seen)) == 59 and set(seen) <= kept_keys(selected)
    assert sum(r[1].skipped["epoch_remainder"] for r in rest) == 1


def test_resume_on_another_selection_or_the_raw_data_is_refused(collection, embedded, selected, tmp_path):
    from mocostream.pipeline.filesystems import Storage
    from mocostream.pipeline.selection import load_table
    from mocostream.pipeline.stream import ResumeMismatch

    other = clustered_copy(embedded, tmp_path / "other")
    select_here(other, target_size=40)
    _, s = stream_keys(load_table(str(selected), storage=Storage()), 1, 0, take=5)
    state = s.checkpoint_state([s.position_state()])
    for data, says in ((other, "another curated selection"), (collection["shards"], "not curated")):
        with pytest.raises(ResumeMismatch, match=says):
            stream_keys(load_table(str(data), storage=Storage()), 1, 0, state=state)
    stream_keys(load_table(str(selected), storage=Storage()), 1, 0, state=state)  # the same selection resumes


@pytest.mark.slow
def test_train_on_the_selection_visits_exactly_the_kept_samples_across_a_stop(embedded, selected, tmp_path):
    def train(data, *extra):
        return cli("train", "--data", str(data), "--epochs", "1", "--steps", "100", "--checkpoint-dir",
                   str(tmp_path / "ck"), "--trace-keys", str(tmp_path / "keys"),
                   *tiny_flags(batch_size=10, arch="resnet18_cifar_small"), *extra)

    r = train(selected, "--stop-after", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len((tmp_path / "keys.rank0").read_text().split()) == 20
    other = clustered_copy(embedded, tmp_path / "other")
    select_here(other, target_size=40)
    r = train(other, "--resume")  # another selection: refused in one line, nothing trained
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "another curated selection" in err[-1] and err[-1].startswith("mocostream: error:")
    r = train(selected, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    keys = (tmp_path / "keys.rank0").read_text().split()
    assert len(keys) == 60 and set(keys) == kept_keys(selected)


def test_a_selection_of_data_that_changed_since_is_refused(selected, tmp_path):
    from mocostream.pipeline.filesystems import Storage
    from mocostream.pipeline.selection import load_table
    from mocostream.pipeline.sources import DataSpecError, resolve_shards

    dest = tmp_path / "dest"
    shutil.copytree(selected, dest, ignore=shutil.ignore_patterns("embeddings", "clusters"))
    doc = json.loads((dest / "manifest.json").read_text())
    (dest / "manifest.json").write_text(json.dumps({**doc, "data_fingerprint": "0" * 32}))
    with pytest.raises(DataSpecError, match="changed since"):
        load_table(str(dest), storage=Storage())
    with pytest.raises(DataSpecError, match="curated selection"):  # eval and the shard tool take the data itself
        resolve_shards(str(dest), storage=Storage())


def test_materialise_writes_the_kept_samples_as_shards(selected, tmp_path):
    from mocostream.curate.materialise import materialise
    from mocostream.pipeline.filesystems import Storage

    dest = tmp_path / "dest"
    shutil.copytree(selected, dest)
    out = materialise(str(dest), "parquet", 25, storage=Storage())
    assert (out["written"], out["rejected"], out["shards"]) == (60, 0, 3)
    t = pq.read_table(dest / "shards" / "shard-000001.parquet")
    sources = [k for p in sorted((dest / "shards").glob("shard-*.parquet")) for k in pq.read_table(p)["source_key"].to_pylist()]
    assert sorted(sources) == sorted(kept_keys(selected)) and t.num_rows == 25
    assert not (dest / ".materialise-work").exists()


# ---- the command line --------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,says", [
    (["curate", "/d", "--embed-with", "w", "--out", "/o", "--keep-fraction", "2"], "--keep-fraction"),
    (["curate", "/d", "--embed-with", "w", "--out", "/o", "--keep-fraction", "0.5", "--target-size", "9"], "not both"),
    (["curate", "cluster", "--out", "/o", "--levels", "5,7"], "--levels"),
    (["curate", "select", "--out", "/o", "--dedup-eps", "1.5"], "--dedup-eps"),
    (["curate", "embed", "/d", "--embed-with", "w", "--out", "/o", "--batch-size", "0"], "--batch-size"),
])
def test_bad_arguments_are_one_line_errors(args, says):
    r = cli(*args)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("mocostream: error:") and says in err[0], r.stderr


@pytest.mark.slow
def test_stages_out_of_order_and_a_weights_file_without_arch_are_one_line_errors(collection, tmp_path):
    r = cli("curate", "select", "--out", str(tmp_path / "empty"))
    assert r.returncode == 2 and "run `mocostream curate embed`" in r.stderr.strip().splitlines()[-1], r.stderr
    r = cli("curate", "embed", str(collection["shards"]), "--embed-with", str(collection["weights"]),
            "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "give --arch" in r.stderr.strip().splitlines()[-1], r.stderr


def test_embed_metrics_pass_promtool(collection, tmp_path):
    from prometheus_client import generate_latest

    from mocostream.ops.metrics import EmbedMetrics

    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    m = EmbedMetrics(0)
    m.started(10, 3)
    m.embedded(64)
    m.skipped("corrupt", 1)
    m.shard_done()
    text = generate_latest(m.registry)
    assert b'mocostream_curate_progress_ratio{rank="0"} 0.4' in text
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
