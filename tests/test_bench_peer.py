"""The CIFAR bench's peer and learning curve: lightly's MoCo example trains and leaves a backbone that is ours
(same layers, names and function), the steady-state and curve-mark arithmetic, and the curve's JSON and PNG."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO

sys.path.insert(0, str(REPO / "bench"))

import cifar_peer  # noqa: E402
import learn_cifar  # noqa: E402
import learn_curve  # noqa: E402


def lightly_python() -> Path | None:
    """A python that imports lightly: this one, or the bench's peer venv if `--peer lightly` made it."""
    for python in (Path(sys.executable), cifar_peer.DEFAULT_VENV / "bin" / "python"):
        imports = python.exists() and subprocess.run([str(python), "-c", "import lightly"],
                                                     stderr=subprocess.DEVNULL).returncode == 0
        if imports:
            return python
    return None


NO_LIGHTLY = ("lightly is not installed here; `python bench/cifar_peer.py --install` makes the peer venv "
              f"({cifar_peer.DEFAULT_VENV}) that this test then uses")


def test_steady_state_is_the_median_after_the_first_interval_and_the_rest_is_start_up():
    # 20 steps of 128 images per interval: 30 s of start-up in the first, then ~50 img/s
    rates = [2560 / (2560 / 50 + 30), 50.0, 52.0, 48.0, 50.0, 51.0]
    result = learn_cifar.steady_state(rates, 2560)
    assert result["steady_images_per_second"] == 50.0
    assert result["seconds_before_steady"] == pytest.approx(30.0)
    # a later slow stretch (a neighbour's burst) is not start-up
    assert learn_cifar.steady_state([*rates, 10.0, 10.0], 2560)["seconds_before_steady"] == pytest.approx(30.0)
    assert learn_cifar.steady_state(rates[:1], 2560) == {"steady_images_per_second": None,
                                                          "seconds_before_steady": None}


def test_curve_marks_take_the_first_checkpoint_at_or_after_each_mark_and_the_last():
    points = [{"step": s, "train_seconds": t} for s, t in ((25, 40.0), (50, 70.0), (75, 130.0), (100, 200.0),
                                                          (110, 219.0))]
    chosen = learn_curve.at_marks(points, 60.0)
    # marks at 60, 120, 180 s: steps 50, 75 and 100 (100 also covers 180); the last checkpoint at the end
    assert [p["step"] for p in chosen] == [50, 75, 100, 110]
    assert learn_curve.at_marks([], 60.0) == []


def test_curve_writer_keeps_every_point_and_draws_a_png(tmp_path):
    curves = {"ours: moco_v1 (resnet18_cifar_half)": [{"step": 0, "images": 0, "minutes": 0.0, "top1": 0.31},
                                                     {"step": 40, "images": 5120, "minutes": 1.1, "top1": 0.35}],
              "lightly 1.6.0 MoCo example": [{"step": 0, "images": 0, "minutes": 0.0, "top1": 0.33},
                                              {"step": 30, "images": 3840, "minutes": 1.0, "top1": 0.36}]}
    meta = {"cpu": "test CPU", "subset": "1000 bank / 1000 queries", "title": "test"}
    learn_curve.write_curves(curves, meta, tmp_path / "c.json", tmp_path / "c.png")
    assert json.loads((tmp_path / "c.json").read_text()) == {**meta, "curves": curves}
    png = (tmp_path / "c.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > height > 300  # two panels side by side


@pytest.mark.slow
def test_peer_trains_and_its_backbone_is_ours_by_name_shape_and_function(imagenette_small, tmp_path):
    python = lightly_python()
    if python is None:
        pytest.skip(NO_LIGHTLY)
    out = tmp_path / "peer"
    r = subprocess.run([str(python), str(cifar_peer.SCRIPT), "--data", str(imagenette_small), "--out", str(out),
                        "--budget-minutes", "10", "--max-steps", "2", "--batch-size", "8", "--workers", "0",
                        "--log-every", "1"], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 2 and summary["images"] == 16 and len(summary["rates"]) == 2
    assert [s["step"] for s in summary["snapshots"]] == [0, 2]
    assert summary["backbone_parameters"] == cifar_peer.backbone_parameters("resnet18_cifar_half")

    from mocostream.moco_core import backbone_of
    from mocostream.ops.evaluate import load_query_encoder
    from mocostream.pipeline.filesystems import Storage

    encoders = []
    for s in summary["snapshots"]:  # a strict load: any other name or shape fails here
        ckpt = cifar_peer.as_checkpoint(Path(s["path"]), tmp_path / f"ckpt-{s['step']}.pt", "resnet18_cifar_half")
        encoders.append(load_query_encoder(str(ckpt), storage=Storage())[0])
    before, after = (dict(e.named_parameters()) for e in encoders)
    assert not torch.equal(before["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"])  # it trained

    # the same function: lightly's network in eval mode and ours with its weights give the same features
    probe = tmp_path / "probe.pt"
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import peer_lightly_moco as p; "
            "torch.manual_seed(1); net = p.build(0.5, 8)[0]; net(torch.randn(8, 3, 32, 32)); net.eval(); "
            "x = torch.randn(4, 3, 32, 32); "
            "torch.save({'x': x, 'y': net(x), 'state': p.torchvision_state(net)}, sys.argv[2])")
    r = subprocess.run([str(python), "-c", code, str(REPO / "bench"), str(probe)], capture_output=True, text=True,
                       timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(probe, weights_only=True)
    ours = encoders[0]
    ours.load_state_dict({**got["state"], **{k: v for k, v in ours.state_dict().items() if k.startswith("fc.")}})
    with torch.no_grad():
        features = backbone_of(ours).eval()(got["x"])
    torch.testing.assert_close(features, got["y"], rtol=1e-4, atol=1e-5)
