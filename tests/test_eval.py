"""Evaluation: the trainer's kNN monitor and its metric, `mocostream eval knn|linear` on a checkpoint
(with the frozen-backbone check), and the trainer stopping cleanly on non-finite losses."""
from __future__ import annotations

import json
import urllib.request

import pytest
import torch

from helpers import finish, tiny, tiny_flags, torchrun
from mocostream.ops.cli import main as cli_main
from mocostream.ops.config import build_config
from mocostream.ops.evaluate import fingerprint
from mocostream.ops.ports import free_port
from mocostream.ops.train import Trainer
from mocostream.pipeline.filesystems import Storage
from mocostream.pipeline.labeled import knn_sets, load_labeled

# workers=0 (augmentation in-process): a worker pool's start, which imports torch again, is most of a short
# run's time; test_labelled_stream_augments_per_epoch_deterministically is the one about workers.
TINY = tiny(queue_size=64, backend="opencv")


@pytest.fixture(scope="module")
def trained(labelled_shards, imagenette_small, tmp_path_factory):
    """A short run with the kNN monitor every 2 steps, serving metrics."""
    ckpt = tmp_path_factory.mktemp("eval-ckpt")
    port = free_port()
    cfg = build_config({}, dict(data=str(labelled_shards), steps=4, checkpoint_dir=str(ckpt),
                                knn_data=str(imagenette_small), knn_every=2, moco_momentum_schedule="cosine",
                                symmetric=True, **{**TINY, "metrics_port": port}))
    with Trainer(cfg) as trainer:  # the endpoint lives as long as the trainer: read it after the last step
        summary = trainer.train()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return summary, text, ckpt


def test_labelled_folder_split_is_deterministic_and_stratified(imagenette_small):
    bank, queries = knn_sets(str(imagenette_small), 32, storage=Storage())
    assert (len(bank), len(queries)) == (100, 20)  # 12 per class: images 5 and 10 of each are queries
    assert bank.images.dtype == torch.uint8 and bank.images.shape[1:] == (3, 32, 32)
    assert torch.bincount(queries.labels).tolist() == [2] * 10
    again = load_labeled(str(imagenette_small), 32, storage=Storage())
    assert torch.equal(torch.cat([bank.labels, queries.labels]).sort().values, again.labels.sort().values)


@pytest.mark.slow
def test_trainer_runs_the_knn_monitor_and_exports_the_new_metrics(trained):
    summary, text, _ = trained
    assert 0.0 <= summary["knn_top1"] <= 1.0 and summary["nonfinite_steps"] == 0
    assert 'mocostream_knn_top1{rank="0"}' in text
    assert 'mocostream_nonfinite_steps_total{rank="0"} 0.0' in text
    assert 'mocostream_knn_duration_seconds_count{rank="0"} 2.0' in text  # at step 2 and at the end
    grad_norm = float(text.split('mocostream_grad_norm{rank="0"} ')[1].split()[0])
    assert grad_norm > 0
    momentum = float(text.split('mocostream_moco_momentum{rank="0"} ')[1].split()[0])
    assert 0.999 < momentum < 1.0  # the cosine schedule has started to raise m


def test_knn_monitor_images_at_their_own_size(imagenette_small):
    """--knn-image-size: a run on small crops can measure its features on larger images; default: --image-size."""
    from mocostream.ops.train import KnnMonitor

    cfg = dict(data="x", knn_data=str(imagenette_small), **TINY)
    assert KnnMonitor(build_config({}, cfg), torch.device("cpu"), Storage()).bank.images.shape[-1] == 32
    monitor = KnnMonitor(build_config({}, dict(cfg, image_size=24, knn_image_size=40)), torch.device("cpu"),
                         Storage())
    assert monitor.bank.images.shape[-2:] == monitor.queries.images.shape[-2:] == (40, 40)


@pytest.mark.slow
@pytest.mark.parametrize("kind,extra", [("knn", []), ("linear", ["--epochs", "3"])])
def test_eval_on_a_checkpoint_keeps_the_backbone_frozen(trained, imagenette_small, kind, extra, capsys):
    _, _, ckpt = trained
    assert cli_main(["eval", kind, "--checkpoint", str(ckpt), "--data", str(imagenette_small),
                     "--image-size", "32", *extra]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["eval"] == kind and 0.0 <= result["top1"] <= 1.0
    assert result["step"] == 4 and result["checkpoint"].endswith("checkpoint-00000004.pt")
    assert (result["train_images"], result["test_images"], result["classes"]) == (100, 20, 10)
    assert result["backbone_unchanged"] is True and len(result["backbone_sha256"]) == 64


def test_random_init_baseline_and_bad_arguments(imagenette_small, capsys):
    assert cli_main(["eval", "knn", "--arch", "resnet18", "--data", str(imagenette_small), "--image-size", "32",
                     "--max-per-class", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 0 and (result["train_images"], result["test_images"]) == (40, 10)
    assert cli_main(["eval", "knn", "--data", str(imagenette_small)]) == 2
    assert "give --checkpoint, or --arch" in capsys.readouterr().err
    assert cli_main(["eval", "knn", "--arch", "resnet18", "--data", "/nonexistent/eval"]) == 2
    assert capsys.readouterr().err.strip() == "mocostream: error: labelled eval data not found: /nonexistent/eval"


def test_fingerprint_sees_a_change_in_bn_statistics():
    from mocostream.moco_core import backbone_of, build_encoder

    backbone = backbone_of(build_encoder("resnet18")(num_classes=8))
    before = fingerprint(backbone)
    backbone.train()(torch.randn(4, 3, 32, 32))  # a train-mode forward moves the running statistics
    assert fingerprint(backbone) != before


@pytest.mark.slow
def test_non_finite_losses_stop_the_job_with_one_line(labelled_shards, tmp_path, capsys):
    # T so small that every logit overflows: every step is non-finite and skipped, then the job stops
    args = ["train", "--data", str(labelled_shards), "--steps", "20", "--checkpoint-dir", str(tmp_path),
            "--temperature", "1e-45", "--max-nonfinite-steps", "3", *tiny_flags(**TINY)]
    assert cli_main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mocostream: error:")]
    assert err == ["mocostream: error: 3 training steps in a row had a non-finite loss or gradient; stopping "
                   "(lower --base-lr, check the data, or raise --max-nonfinite-steps)"]


def test_labelled_shards_tar_and_parquet(imagenette_small, tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    files = sorted(imagenette_small.rglob("*.JPEG"))[:30]
    classes = sorted({f.parent.name for f in files})
    with wds.TarWriter(str(tmp_path / "eval-000000.tar")) as tw:
        for i, f in enumerate(files):
            sample = {"__key__": f"s{i:03d}", "jpg": f.read_bytes()}
            if i % 3 == 0:
                sample["cls"] = str(classes.index(f.parent.name)).encode()
            elif i % 3 == 1:
                sample["json"] = json.dumps({"label": classes.index(f.parent.name)}).encode()
            # every third sample has no label: skipped and counted
            tw.write(sample)
    got = load_labeled(str(tmp_path / "eval-000000.tar"), 32, storage=Storage())
    assert len(got) == 20 and got.skipped["no_label"] == 10
    expected = [classes.index(f.parent.name) for i, f in enumerate(files) if i % 3 != 2]
    assert got.labels.tolist() == expected

    table = pa.table({"key": [f"s{i}" for i in range(len(files))], "image": [f.read_bytes() for f in files],
                      "label": [classes.index(f.parent.name) for f in files]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "eval-000000.parquet").write_bytes(buf.getvalue())
    got = load_labeled(str(tmp_path / "pq"), 32, storage=Storage())
    assert len(got) == 30 and got.labels.tolist() == [classes.index(f.parent.name) for f in files]


REFERENCE = ["--protocol", "reference", "--image-size", "32", "--epochs", "3", "--batch-size", "32", "--workers", "0"]


@pytest.mark.slow
def test_reference_linear_protocol_keeps_the_backbone_and_writes_the_classifier(trained, imagenette_small, tmp_path,
                                                                                capsys):
    _, _, ckpt = trained
    out = tmp_path / "linear.pt"
    assert cli_main(["eval", "linear", "--checkpoint", str(ckpt), "--data", str(imagenette_small), *REFERENCE,
                     "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["protocol"] == "reference" and result["epochs"] == 3 and result["lr"] == 30.0
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0 and result["world"] == 1
    assert (result["train_images"], result["test_images"], result["classes"]) == (100, 20, 10)
    assert result["backbone_unchanged"] is True and result["skipped"] == {}
    assert cli_main(["eval", "knn", "--checkpoint", str(ckpt), "--data", str(imagenette_small),
                     "--image-size", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["backbone_sha256"] == result["backbone_sha256"]  # the same weights
    classifier = torch.load(out, weights_only=True)
    assert classifier["weight"].shape == (10, 512) and classifier["bias"].shape == (10,)
    assert classifier["classes"] == sorted(p.name for p in imagenette_small.iterdir())
    assert classifier["backbone_sha256"] == result["backbone_sha256"] and classifier["top1"] == result["top1"]


@pytest.mark.slow
def test_labelled_stream_augments_per_epoch_deterministically(imagenette_small):
    from mocostream.pipeline.labeled_stream import LabeledStream, labeled_units

    units, classes = labeled_units(str(imagenette_small), "train", storage=Storage())
    assert sum(u.count for u in units) == 100 and len(classes) == 10

    def epoch(workers: int, e: int, train: bool = True):
        stream = LabeledStream(units, batch_size=16, size=32, train=train, workers=workers, storage=Storage())
        batches = list(stream.epoch(e))
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    x0, y0 = epoch(0, 0)
    x1, y1 = epoch(1, 0)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)  # the same whichever process augments
    assert x0.shape == (100, 3, 32, 32) and torch.bincount(y0).tolist() == [10] * 10
    x2, y2 = epoch(0, 1)
    assert not torch.equal(y0, y2) and sorted(y0.tolist()) == sorted(y2.tolist())  # a new order every epoch
    v0, _ = epoch(0, 0, train=False)
    v1, _ = epoch(0, 1, train=False)
    assert torch.equal(v0, v1)  # validation: centre crops, no randomness


@pytest.mark.slow
def test_reference_linear_protocol_under_torchrun(trained, imagenette_small):
    _, _, ckpt = trained
    proc = torchrun("eval", "linear", "--checkpoint", str(ckpt), "--data", str(imagenette_small), *REFERENCE)
    out = finish(proc, 600)
    assert proc.returncode == 0, out[-3000:]
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(results) == 1  # rank 0 reports
    assert results[0]["world"] == 2 and results[0]["test_images"] == 20 and results[0]["train_images"] == 100
    assert results[0]["backbone_unchanged"] is True


def test_labelled_stream_reads_labelled_shards(imagenette_small, tmp_path):
    import webdataset as wds

    from mocostream.pipeline.labeled_stream import LabeledStream, labeled_units, shard_class_names

    files = sorted(imagenette_small.rglob("*.JPEG"))[:24]
    classes = sorted({f.parent.name for f in files})
    (tmp_path / "s").mkdir()
    with wds.TarWriter(str(tmp_path / "s" / "eval-000000.tar")) as tw:
        for i, f in enumerate(files):
            label = classes.index(f.parent.name)
            meta = {"label": f.parent.name if i == 0 else label}  # a class name is no index: skipped, counted
            tw.write({"__key__": f"s{i:03d}", "jpg": f.read_bytes(), "json": json.dumps(meta).encode()})
    units, names = labeled_units(str(tmp_path / "s"), storage=Storage())
    assert names is None and [u.count for u in units] == [24]  # no manifest: no class names known
    stream = LabeledStream(units, batch_size=8, size=32, train=True, workers=0, storage=Storage())
    labels = torch.cat([y for _, y in stream.epoch(0)])
    assert sorted(labels.tolist()) == sorted(classes.index(f.parent.name) for f in files[1:])
    assert stream.skipped == {"unknown_class": 1}  # a class name with no names to index it by
    assert shard_class_names(units, storage=Storage()) == [files[0].parent.name]  # the counting pass finds it


def _class_tree(imagenette_small, dest, classes: list[str], per_class: int):
    """A small class-folder tree: `per_class` images of each of `classes` (imagenette folder names)."""
    import shutil

    for name in classes:
        (dest / name).mkdir(parents=True)
        for f in sorted((imagenette_small / name).iterdir())[:per_class]:
            shutil.copy(f, dest / name / f.name)
    return dest


@pytest.fixture(scope="module")
def named_shards(imagenette_small, tmp_path_factory):
    """train/ and val/ shards made by `shards create` from class folders (labels: the folder names); val has
    one class train lacks."""
    names = sorted(p.name for p in imagenette_small.iterdir())
    root = tmp_path_factory.mktemp("named")
    trees = {"train": (names[:3], 6), "val": ([names[0], names[2], names[5]], 2)}
    for part, (classes, per_class) in trees.items():
        _class_tree(imagenette_small, root / "folders" / part, classes, per_class)
        assert cli_main(["shards", "create", str(root / "folders" / part), "--out", str(root / "shards" / part),
                         "--format", "tar,parquet", "--samples-per-shard", "7", "--shuffle", "--quiet"]) == 0
    return root, names


def _without_classes(src, dest):
    """A copy of a shard set whose manifests do not record the class names (as older sets)."""
    import shutil

    shutil.copytree(src, dest)
    for m in dest.glob("manifest*.json"):
        doc = json.loads(m.read_text())
        doc.pop("classes")
        m.write_text(json.dumps(doc))
    return dest


@pytest.mark.parametrize("manifest", ["manifest.json", "manifest-parquet.json"])
def test_shards_of_class_folders_label_as_the_folders(named_shards, manifest, tmp_path):
    root, names = named_shards
    m = json.loads((root / "shards" / "train" / manifest).read_text())
    assert m["classes"] == names[:3]
    folder = load_labeled(str(root / "folders" / "train"), 32, storage=Storage())
    for spec in (root / "shards" / "train" / manifest, _without_classes(root / "shards" / "train", tmp_path / "old")):
        got = load_labeled(str(spec), 32, storage=Storage())
        assert got.classes == folder.classes == names[:3] and got.skipped == {}
        # the same image has the same label (the shards hold them shuffled)
        assert (sorted(zip(got.images.sum((1, 2, 3)).tolist(), got.labels.tolist()))
                == sorted(zip(folder.images.sum((1, 2, 3)).tolist(), folder.labels.tolist())))
    # train/ and val/ index the names alike; a class only in val is skipped and counted
    bank, queries = knn_sets(str(root / "shards"), 32, storage=Storage())
    assert bank.classes == queries.classes == names[:3]
    assert sorted(queries.labels.tolist()) == [0, 0, 2, 2] and queries.skipped == {"unknown_class": 2}


def test_eval_knn_on_named_shards_matches_the_folders(named_shards, capsys):
    root, _ = named_shards
    results = []
    for data in (root / "folders" / "train", root / "shards" / "train"):
        assert cli_main(["eval", "knn", "--arch", "resnet18", "--data", str(data), "--image-size", "32"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    keys = ("classes", "train_images", "test_images", "skipped")
    assert [{k: r[k] for k in keys} for r in results] == [
        {"classes": 3, "train_images": 15, "test_images": 3, "skipped": {}}] * 2


def test_reference_linear_protocol_on_named_shards(named_shards, tmp_path, capsys):
    root, names = named_shards
    runs = []
    for data in (root / "shards", _without_classes(root / "shards" / "train", tmp_path / "old" / "train").parent):
        if data != root / "shards":
            import shutil
            shutil.copytree(root / "shards" / "val", data / "val")  # the counting pass runs on train/ only
        out = tmp_path / f"linear{len(runs)}.pt"
        assert cli_main(["eval", "linear", "--arch", "resnet18", "--data", str(data), "--protocol", "reference",
                         "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0",
                         "--out", str(out)]) == 0
        runs.append(json.loads(capsys.readouterr().out))
        assert torch.load(out, weights_only=True)["classes"] == names[:3]
    for r in runs:
        assert r["classes"] == 3 and r["train_images"] == 18 and r["test_images"] == 4
        assert r["skipped"] == {"unknown_class": 2} and 0.0 <= r["top1"] <= r["top5"] <= 1.0
    assert runs[0]["top1"] == runs[1]["top1"]  # from the manifest or counted: the same indices


@pytest.mark.slow
def test_reference_linear_protocol_on_named_shards_under_torchrun(named_shards, tmp_path):
    """No classes in the manifest: rank 0 counts them, every rank indexes by the same names."""
    import shutil

    root, _ = named_shards
    data = tmp_path / "old"
    _without_classes(root / "shards" / "train", data / "train")
    shutil.copytree(root / "shards" / "val", data / "val")
    proc = torchrun("eval", "linear", "--arch", "resnet18", "--data", str(data), "--protocol", "reference",
                    "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0")
    out = finish(proc, 600)
    assert proc.returncode == 0, out[-3000:]
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(results) == 1 and results[0]["world"] == 2 and results[0]["classes"] == 3
    assert results[0]["test_images"] == 4 and results[0]["skipped"] == {"unknown_class": 2}
