"""`--recipe moco_v3` through the whole path, small (vit_tiny at 32 px, a ResNet-18 with LARS): training, metrics,
checkpoints, exact and elastic resume, the time budget, export (torchvision, timm, safetensors) and --init-from."""
from __future__ import annotations

import json
import math
import urllib.request

import pytest
import torch
import torch.nn as nn

from helpers import cli, finish, tiny_flags, torchrun
from mocostream.moco_core import backbone_of, momentum_at
from mocostream.ops.cli import main as cli_main
from mocostream.ops.config import build_config
from mocostream.ops.evaluate import load_query_encoder
from mocostream.ops.ports import free_port
from mocostream.ops.train import Trainer, build_model, build_v3, train
from mocostream.ops.weights import WeightsError, init_backbones
from mocostream.pipeline.filesystems import Storage

# small heads: the reference's 4096-wide MLPs would cost more than vit_tiny itself on these CPUs
V3 = dict(recipe="moco_v3", arch="vit_tiny", image_size=32, batch_size=8, dim=32, mlp_dim=64, workers=0,
          log_every=1, progress=False, metrics_port=0, backend="opencv")


def config(shards, tmp_path, name: str, **over):
    return build_config({}, {"data": str(shards), "checkpoint_dir": str(tmp_path / name), **V3, **over})


@pytest.fixture(scope="module")
def vit_run(labelled_shards, tmp_path_factory):
    """2 steps of vit_tiny (AdamW) with the metrics endpoint read after the last step: summary, metrics text,
    checkpoint."""
    tmp = tmp_path_factory.mktemp("v3")
    port = free_port()
    cfg = build_config({}, {"data": str(labelled_shards), "checkpoint_dir": str(tmp / "ckpt"), "steps": 2,
                            **{**V3, "metrics_port": port}})
    with Trainer(cfg) as trainer:
        summary = trainer.train()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return cfg, summary, text


def test_vit_trains_with_adamw_and_reports_its_metrics(vit_run):
    cfg, summary, text = vit_run
    assert (cfg.optimizer, cfg.temperature, cfg.moco_momentum, cfg.moco_momentum_schedule) == \
        ("adamw", 0.2, 0.99, "cosine")
    assert summary["step"] == 2 and math.isfinite(summary["loss"]) and 0 <= summary["instance_accuracy"] <= 1
    state = torch.load(summary["checkpoint"], map_location="cpu", weights_only=False)
    assert any(k.startswith("base_encoder.blocks.") for k in state["model"]) and "predictor.0.weight" in state["model"]
    assert not any(k.startswith("queue") for k in state["model"])
    assert set(state["optimizer"]["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    # the frozen parts stayed out of the optimizer and did not move
    fresh = build_model(cfg, 1, torch.device("cpu")).state_dict()
    for name in ("base_encoder.pos_embed", "base_encoder.patch_embed.proj.weight"):
        assert torch.equal(state["model"][name], fresh[name])
    # the last logged step's m: the cosine schedule at step 1 of 2 (set before that step ran)
    line = next(x for x in text.splitlines() if x.startswith("mocostream_moco_momentum{"))
    assert float(line.split()[-1]) == pytest.approx(momentum_at(0.99, 1, 2, "cosine")) != 0.99
    assert 'mocostream_instance_accuracy{rank="0"}' in text and 'mocostream_loss{rank="0"}' in text


@pytest.mark.slow
def test_resume_continues_the_exact_keys_and_losses(labelled_shards, tmp_path):
    """Cut after 1 step and resumed: the keys and losses of an uninterrupted 3-step run (AdamW state, m schedule
    and RNG restored)."""
    def run(steps, name, resume=False, stop_after=None):
        return train(config(labelled_shards, tmp_path, name, steps=steps, resume=resume, stop_after=stop_after,
                            trace_keys=str(tmp_path / f"{name}.keys")))

    run(3, "whole")
    assert run(3, "cut", stop_after=1)["step"] == 1
    assert run(3, "cut", resume=True)["step"] == 3
    for suffix in ("", ".loss"):
        whole = (tmp_path / f"whole.keys.rank0{suffix}").read_text()
        assert (tmp_path / f"cut.keys.rank0{suffix}").read_text() == whole and whole


def test_resnet_with_lars_on_a_time_budget(labelled_shards, tmp_path):
    """ResNet-18 (the reference's ResNet recipe: LARS, T 1.0, zero-initialised residual branches) on
    --budget-minutes: the run ends with its clock and checkpoints its seconds."""
    cfg = config(labelled_shards, tmp_path, "r18", arch="resnet18", budget_minutes=0.1, steps=None)
    assert (cfg.optimizer, cfg.temperature, cfg.base_lr, cfg.weight_decay) == ("lars", 1.0, 0.6, 1e-6)
    summary = train(cfg)
    assert summary["train_seconds"] >= 6 and summary["step"] >= 1 and math.isfinite(summary["loss"])
    state = torch.load(summary["checkpoint"], map_location="cpu", weights_only=False)
    assert state["train_seconds"] == summary["train_seconds"]
    assert set(state["optimizer"]["state"][0]) == {"mu"}
    assert "base_encoder.fc.0.weight" in state["model"] and "predictor.3.weight" in state["model"]
    assert "predictor.4.running_mean" not in state["model"]  # the ResNet predictor ends without BN


def test_vit_on_a_time_budget_from_init_from(vit_run, labelled_shards, tmp_path, capsys):
    """A ViT run with --budget-minutes, started by --init-from from a timm file: both encoders hold the file's
    backbone before the first step (head fresh), and the run ends with its clock and checkpoints its seconds."""
    _, first, _ = vit_run
    export(capsys, first["checkpoint"], "--out", tmp_path / "timm.pth", "--format", "timm")
    weights = torch.load(tmp_path / "timm.pth", weights_only=True)
    cfg = config(labelled_shards, tmp_path, "vit-budget", budget_minutes=0.1, steps=None,
                 init_from=str(tmp_path / "timm.pth"))
    with Trainer(cfg) as trainer:
        fresh = build_model(cfg, 1, torch.device("cpu")).base_encoder.state_dict()
        for encoder in (trainer.model.base_encoder, trainer.model.momentum_encoder):
            state = encoder.state_dict()
            assert all(torch.equal(state[k], v) for k, v in weights.items())
            assert torch.equal(state["head.0.weight"], fresh["head.0.weight"])  # the projector starts fresh
        assert not torch.equal(weights["blocks.0.attn.qkv.weight"], fresh["blocks.0.attn.qkv.weight"])
        summary = trainer.train()
    assert summary["train_seconds"] >= 6 and summary["step"] >= 1 and math.isfinite(summary["loss"])
    state = torch.load(summary["checkpoint"], map_location="cpu", weights_only=False)
    assert state["train_seconds"] == summary["train_seconds"] and state["config"]["arch"] == "vit_tiny"


def test_v3_batch_norms_become_sync_batch_norm_under_ddp_on_gpus():
    """As the reference: every BN of the model (encoders, projectors, predictor) is a SyncBatchNorm on several
    CUDA ranks; on one rank, or on CPU ranks (no SyncBatchNorm kernel), plain BN. (The conversion itself needs no
    GPU; build_model moves the model afterwards.)"""
    def norms(model):
        return [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for arch in ("vit_tiny", "resnet18_cifar_half"):
        cfg = build_config({}, {**V3, "data": "/d", "arch": arch})
        synced = norms(build_v3(cfg, 2, cuda))
        assert len(synced) >= 5 and set(synced) == {nn.SyncBatchNorm}, arch  # ViT: only the MLPs' BNs
        for world, device in ((1, cuda), (2, cpu)):
            assert nn.SyncBatchNorm not in norms(build_v3(cfg, world, device)), (arch, world, device)


@pytest.mark.slow
def test_elastic_resume_2_to_1_ranks_consumes_each_sample_once(labelled_shards, tmp_path):
    """2 ranks (gloo: BN per rank's share) for 2 steps, then 1 rank for 2 steps from the checkpoint."""
    flags = ["--data", str(labelled_shards), "--steps", "50", "--checkpoint-dir", str(tmp_path / "ck"),
             *tiny_flags(**{k: v for k, v in V3.items() if k not in ("progress",)}), "--no-progress"]
    proc = torchrun("train", *flags, "--trace-keys", str(tmp_path / "a"), "--stop-after", "2", nproc=2)
    out = finish(proc, 600)
    assert proc.returncode == 0, out[-3000:]
    assert "BN statistics per rank's share" in out
    r = cli("train", *flags, "--trace-keys", str(tmp_path / "b"), "--stop-after", "2", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    keys = [k for name in ("a.rank0", "a.rank1", "b.rank0") for k in (tmp_path / name).read_text().split()]
    assert len(keys) == len(set(keys)) == 3 * 2 * 8


def export(capsys, *args) -> dict:
    assert cli_main(["export", *map(str, args)]) == 0
    return json.loads(capsys.readouterr().out)


def test_vit_export_loads_into_torchvision_and_timm_with_the_same_features(vit_run, tmp_path, capsys):
    import timm
    import torchvision

    cfg, summary, _ = vit_run
    encoder, info = load_query_encoder(summary["checkpoint"], storage=Storage())
    ours = backbone_of(encoder).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = ours(x)

    report = export(capsys, summary["checkpoint"], "--out", tmp_path / "tv.pth", "--format", "torchvision")
    assert report["missing_by_design"] == ["heads.head.weight", "heads.head.bias"]
    assert "torchvision.models.VisionTransformer(image_size=32, patch_size=4" in report["load_with"]
    tv = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=12, num_heads=3, hidden_dim=192,
                                              mlp_dim=768)
    tv.heads = nn.Identity()
    tv.load_state_dict(torch.load(tmp_path / "tv.pth", weights_only=True), strict=True)

    report = export(capsys, summary["checkpoint"], "--out", tmp_path / "timm.pth", "--format", "timm")
    assert report["missing_by_design"] == ["head.weight", "head.bias"] and "timm.models.VisionTransformer" in \
        report["load_with"]
    tm = timm.models.VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, num_classes=0)
    tm.load_state_dict(torch.load(tmp_path / "timm.pth", weights_only=True), strict=True)

    report = export(capsys, summary["checkpoint"], "--out", tmp_path / "b.safetensors", "--format", "safetensors")
    from safetensors.torch import load_file

    assert load_file(tmp_path / "b.safetensors").keys() == torch.load(tmp_path / "timm.pth").keys()
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tm.eval()(x), expected, rtol=1e-4, atol=1e-5)
    assert info["image_size"] == 32 and info["step"] == 2


def test_init_from_a_timm_vit_file_starts_both_encoders(vit_run, tmp_path, capsys):
    cfg, summary, _ = vit_run
    export(capsys, summary["checkpoint"], "--out", tmp_path / "timm.pth", "--format", "timm")
    weights = torch.load(tmp_path / "timm.pth", weights_only=True)
    model = build_model(cfg, 1, torch.device("cpu"))
    init_backbones(model, str(tmp_path / "timm.pth"), cfg.arch, storage=Storage())
    for encoder in (model.base_encoder, model.momentum_encoder):
        state = encoder.state_dict()
        assert all(torch.equal(state[k], v) for k, v in weights.items())
    assert not model.momentum_encoder.head[0].weight.requires_grad  # still the frozen copy
    other = build_config({}, {**V3, "data": "/d", "arch": "vit_small", "image_size": 32})
    with pytest.raises(WeightsError, match="does not fit --arch vit_small"):
        init_backbones(build_model(other, 1, torch.device("cpu")), str(tmp_path / "timm.pth"), "vit_small",
                       storage=Storage())


def test_v3_resnets_start_with_zero_residual_branches_and_vits_frozen():
    """The reference builds v3 ResNets with zero_init_residual=True (every block the identity at the start)
    and ViTs with stop_grad_conv1 (unless --no-stop-grad-conv1)."""
    import torchvision

    for arch in ("resnet18", "resnet18_cifar_half"):
        model = build_model(build_config({}, {**V3, "data": "/d", "arch": arch}), 1, torch.device("cpu"))
        blocks = [m for m in model.base_encoder.modules() if isinstance(m, torchvision.models.resnet.BasicBlock)]
        assert len(blocks) == 8 and all(not b.bn2.weight.any() for b in blocks)
    v2 = build_model(build_config({}, {"data": "/d", "arch": "resnet18"}), 1, torch.device("cpu"))
    assert v2.encoder_q.layer1[0].bn2.weight.all()  # v1/v2: torchvision's default initialisation
    vit = build_model(build_config({}, {**V3, "data": "/d", "stop_grad_conv1": False}), 1, torch.device("cpu"))
    assert vit.base_encoder.patch_embed.proj.weight.requires_grad and not vit.base_encoder.pos_embed.requires_grad
