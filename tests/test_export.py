"""Handing the backbone over: `mocostream export` (torchvision, safetensors, detectron2), refusing files it did
not write, `train --init-from` weights, and the fp16 step with its gradient scaler."""
from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from helpers import tiny
from mocostream.ops.cli import main as cli_main
from mocostream.ops.config import build_config
from mocostream.ops.evaluate import load_query_encoder
from mocostream.ops.train import train
from mocostream.pipeline.augment_reference import normalize
from mocostream.pipeline.filesystems import Storage
from mocostream.pipeline.labeled import load_labeled

TINY = {k: v for k, v in tiny(queue_size=64, backend="opencv").items() if k != "arch"}  # each test names its arch


@pytest.fixture(scope="module")
def r50_checkpoint(labelled_shards, tmp_path_factory):
    """Two MoCo v2 steps of a ResNet-50 (MLP head): the checkpoint every export test reads."""
    ckpt = tmp_path_factory.mktemp("export-ckpt")
    train(build_config({}, dict(data=str(labelled_shards), steps=2, arch="resnet50", checkpoint_dir=str(ckpt),
                                          **TINY)))
    return ckpt / "checkpoint-00000002.pt"


def export(capsys, *args) -> dict:
    assert cli_main(["export", *map(str, args)]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def images(imagenette_small):
    return normalize(load_labeled(str(imagenette_small), 64, max_per_class=1, storage=Storage()).images)


@pytest.mark.slow
def test_torchvision_export_loads_strictly_and_gives_the_same_features(r50_checkpoint, tmp_path, images, capsys):
    out = tmp_path / "r50.pth"
    report = export(capsys, r50_checkpoint.parent, "--out", out, "--format", "torchvision")
    assert report["missing_by_design"] == ["fc.weight", "fc.bias"] and report["step"] == 2
    assert "torchvision.models.resnet50()" in report["load_with"]
    state = torch.load(out, weights_only=True)
    missing, unexpected = torchvision.models.resnet50().load_state_dict(state, strict=False)
    assert (missing, unexpected) == (["fc.weight", "fc.bias"], [])
    net = torchvision.models.resnet50()
    net.fc = nn.Identity()
    net.load_state_dict(state, strict=True)

    from mocostream.moco_core import backbone_of

    encoder, _ = load_query_encoder(str(r50_checkpoint), storage=Storage())
    ours = backbone_of(encoder).eval()
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(images), ours(images), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_safetensors_round_trip_with_metadata(r50_checkpoint, tmp_path, capsys):
    from safetensors import safe_open

    export(capsys, r50_checkpoint, "--out", tmp_path / "tv.pth", "--format", "torchvision")
    export(capsys, r50_checkpoint, "--out", tmp_path / "r50.safetensors", "--format", "safetensors")
    expected = torch.load(tmp_path / "tv.pth", weights_only=True)
    with safe_open(str(tmp_path / "r50.safetensors"), "pt") as f:
        meta = f.metadata()
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert meta["arch"] == "resnet50" and meta["recipe"] == "moco_v2" and meta["step"] == "2"
    assert meta["images_seen"] == "16" and meta["encoder"] == "query"
    assert meta["source_sha256"] == hashlib.sha256(r50_checkpoint.read_bytes()).hexdigest()

    from mocostream.ops.weights import read_backbone  # what --init-from reads: the same tensors

    again = read_backbone(str(tmp_path / "r50.safetensors"), storage=Storage())
    assert all(torch.equal(again[k], expected[k]) for k in expected)


def expected_detectron2_r50() -> dict[str, tuple]:
    """detectron2's ResNet-50 names and shapes, written out from its layout (stem, res2..res5 of 3/4/6/3
    bottleneck blocks, convN.norm, a shortcut in each stage's first block)."""
    def conv_bn(name: str, shape: tuple) -> dict:
        c = shape[0]
        return {f"{name}.weight": shape, **{f"{name}.norm.{p}": (c,) for p in ("weight", "bias", "running_mean",
                                                                                "running_var")},
                f"{name}.norm.num_batches_tracked": ()}

    names = conv_bn("stem.conv1", (64, 3, 7, 7))
    cin = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=2):
        for b in range(blocks):
            p = f"res{stage}.{b}"
            names |= conv_bn(f"{p}.conv1", (width, cin, 1, 1))
            names |= conv_bn(f"{p}.conv2", (width, width, 3, 3))
            names |= conv_bn(f"{p}.conv3", (4 * width, width, 1, 1))
            if b == 0:
                names |= conv_bn(f"{p}.shortcut", (4 * width, cin, 1, 1))
            cin = 4 * width
    return names


@pytest.mark.slow
def test_detectron2_export_has_its_names_and_shapes(r50_checkpoint, tmp_path, capsys):
    out = tmp_path / "r50.pkl"
    report = export(capsys, r50_checkpoint, "--out", out, "--format", "detectron2")
    assert report["missing_by_design"] == [] and "MODEL.WEIGHTS" in report["load_with"]
    with open(out, "rb") as f:
        obj = pickle.load(f, encoding="latin1")  # as detectron2's checkpointer reads a .pkl
    assert obj["__author__"] == "mocostream" and obj["matching_heuristics"] is True
    model = obj["model"]
    assert all(isinstance(v, np.ndarray) for v in model.values())
    expected = expected_detectron2_r50()
    assert {k: tuple(v.shape) for k, v in model.items()} == expected
    state = torch.load(r50_checkpoint, weights_only=True)["model"]
    assert np.array_equal(model["res4.5.conv2.norm.running_var"], state["encoder_q.layer3.5.bn2.running_var"].numpy())
    assert np.array_equal(model["res3.0.shortcut.norm.weight"], state["encoder_q.layer2.0.downsample.1.weight"].numpy())
    assert cli_main(["export", str(r50_checkpoint), "--out", str(tmp_path / "x.pth"), "--format", "detectron2"]) == 2


@pytest.mark.slow
def test_key_encoder_export(r50_checkpoint, tmp_path, capsys):
    export(capsys, r50_checkpoint, "--out", tmp_path / "k.pth", "--format", "torchvision", "--encoder", "key")
    got = torch.load(tmp_path / "k.pth", weights_only=True)
    state = torch.load(r50_checkpoint, weights_only=True)["model"]
    assert all(torch.equal(v, state[f"encoder_k.{k}"]) for k, v in got.items())
    assert not torch.equal(got["conv1.weight"], state["encoder_q.conv1.weight"])  # momentum, not a copy


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_crafted_pickle_and_foreign_files_are_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "checkpoint-00000001.pt"
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        evil.write_bytes(pickle.dumps({"model": _Payload(marker)}, protocol=protocol))
        assert cli_main(["export", str(evil), "--out", str(tmp_path / "o.pth"), "--format", "torchvision"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "refused: not a file of plain tensors" in err
        assert "nothing in it was run" in err and ("posix.system" in err or protocol > 2)
        assert not marker.exists() and not (tmp_path / "o.pth").exists()

    plain = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), plain)
    assert cli_main(["export", str(plain), "--out", str(tmp_path / "o.pth"), "--format", "safetensors"]) == 2
    assert capsys.readouterr().err.strip() == \
        f"mocostream: error: {plain} is not a mocostream training checkpoint (no encoder_q weights in it)"
    assert cli_main(["export", str(tmp_path / "none"), "--out", str(tmp_path / "o.pth"), "--format", "torchvision"]) == 2
    assert capsys.readouterr().err.strip() == f"mocostream: error: no checkpoint in {tmp_path / 'none'}"


@pytest.mark.slow
def test_init_from_a_torchvision_state_dict(labelled_shards, tmp_path, capsys):
    torch.manual_seed(123)
    weights = torchvision.models.resnet18().state_dict()
    torch.save(weights, tmp_path / "r18.pth")
    ckpt = tmp_path / "ckpt"
    # --stop-after 0: the checkpoint holds the encoders the first step starts from
    summary = train(build_config({}, dict(data=str(labelled_shards), steps=5, arch="resnet18", init_from=str(tmp_path / "r18.pth"),
                                          checkpoint_dir=str(ckpt), stop_after=0, **TINY)))
    model = torch.load(ckpt / "checkpoint-00000000.pt", weights_only=True)["model"]
    for name, value in weights.items():
        if not name.startswith("fc."):
            assert torch.equal(model[f"encoder_q.{name}"], value), name
            assert torch.equal(model[f"encoder_k.{name}"], value), name
    assert model["encoder_q.fc.0.weight"].shape == (512, 512)  # the v2 MLP head: fresh, not the classifier
    assert torch.equal(model["encoder_q.fc.2.weight"], model["encoder_k.fc.2.weight"])
    # a resumed run continues from its checkpoint: --init-from is not read again
    summary = train(build_config({}, dict(data=str(labelled_shards), steps=5, arch="resnet18", init_from=str(tmp_path / "gone"),
                                          checkpoint_dir=str(ckpt), resume=True, stop_after=0, **TINY)))
    assert summary["step"] == 0 and summary["stopped"]

    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    args = ["train", "--data", str(labelled_shards), "--arch", "resnet18", "--init-from", str(tmp_path / "r50.pth"),
            "--checkpoint-dir", str(tmp_path / "c2"), "--metrics-port", "0", "--backend", "opencv", "--no-progress"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"mocostream: error: --init-from {tmp_path / 'r50.pth'} does not fit --arch resnet18: ")
    assert "unexpected (layer1.0.bn3.bias" in err and "shapes differ (file vs model: layer1.0.conv1.weight" in err


def test_fp16_scaler_and_guard_agree_on_an_overflow_step():
    """An fp16 overflow (scaled gradient above 65504) is skipped once, counted once, and halves the scale;
    the next step trains."""
    from mocostream.moco_core import NonFiniteGuard, build_optimizer
    from mocostream.ops.precision import StepPrecision

    torch.manual_seed(0)
    net = nn.Linear(4, 2)
    opt = build_optimizer(net, 0.1)
    cpu = torch.device("cpu")
    amp, guard = StepPrecision("fp16", cpu), NonFiniteGuard(cpu, 10)
    params = list(net.parameters())

    def step(x):
        with amp.autocast():
            y = net(x)
            loss = y.float().mean()
        assert y.dtype == torch.float16
        opt.zero_grad(set_to_none=True)
        amp.backward_and_step(loss, opt, guard, params)

    w0 = net.weight.detach().clone()
    scale = amp.scaler.get_scale()
    step(torch.full((8, 4), 1e3))  # dL/dW = scale / 16 * 8e3: over fp16's range
    assert guard.check() == 1 and torch.equal(net.weight, w0) and amp.scaler.get_scale() == scale / 2
    assert torch.count_nonzero(opt.state[net.weight]["momentum_buffer"]) == 0  # nothing of it stayed behind
    step(torch.full((8, 4), 1e-3))
    assert guard.check() == 0 and not torch.equal(net.weight, w0) and amp.scaler.get_scale() == scale / 2


def test_precision_auto_picks_bf16_only_where_supported(monkeypatch):
    from mocostream.ops.precision import precision_mode

    cuda = torch.device("cuda", 0)
    assert precision_mode("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a V100 / T4
    assert precision_mode("auto", cuda) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision_mode("auto", cuda) == "bf16" and precision_mode("fp16", cuda) == "fp16"


@pytest.mark.slow
def test_fp16_training_on_cpu_keeps_fp32_weights_and_checkpoints_the_scaler(labelled_shards, tmp_path):
    summary = train(build_config({}, dict(data=str(labelled_shards), steps=3, arch="resnet18", precision="fp16",
                                          checkpoint_dir=str(tmp_path), **TINY)))
    assert summary["step"] == 3 and np.isfinite(summary["loss"])
    state = torch.load(tmp_path / "checkpoint-00000003.pt", weights_only=True)
    assert state["grad_scaler"]["scale"] > 0 and state["model"]["encoder_q.conv1.weight"].dtype == torch.float32


@pytest.mark.slow
def test_export_from_and_to_s3_and_init_from_s3(s3_env, r50_checkpoint, tmp_path, capsys):
    from mocostream.ops.weights import read_backbone

    bucket = s3_env.make_bucket("export")
    fs = s3_env.filesystem()
    fs.put_file(str(r50_checkpoint), f"{bucket}/ckpt/{r50_checkpoint.name}")
    report = export(capsys, f"s3://{bucket}/ckpt", "--out", f"s3://{bucket}/out/r50.safetensors",
                    "--format", "safetensors")
    assert report["source"].endswith(f"{bucket}/ckpt/{r50_checkpoint.name}") and report["step"] == 2
    export(capsys, r50_checkpoint, "--out", tmp_path / "r50.safetensors", "--format", "safetensors")
    remote = read_backbone(f"s3://{bucket}/out/r50.safetensors", storage=Storage())
    local = read_backbone(str(tmp_path / "r50.safetensors"), storage=Storage())
    assert set(remote) == set(local) and all(torch.equal(remote[k], local[k]) for k in local)
