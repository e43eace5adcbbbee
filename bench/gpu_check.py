"""GPU readiness check, one prepared script for a machine with an NVIDIA GPU (under 5 minutes):

  1. DALI `mixed` (nvJPEG) decode + GPU two-view augmentation: loader images/s at 224 px;
  2. a short MoCo v2 training run, ResNet-50, NCCL on one GPU (torchrun, 1 process), bf16 autocast
     and channels_last: training images/s and the share of step time spent waiting for data;
  3. the MoCo step (forward, loss, backward, non-finite guard, fused SGD) under
     `torch.cuda.set_sync_debug_mode("error")`, in bf16 and in fp16 with the gradient scaler: it must not
     synchronise with the host;
  4. fp16 (the path of GPUs without bf16: V100, T4): `--precision auto` picks bf16 exactly when
     `torch.cuda.is_bf16_supported()`; a short `--precision fp16` training run (images/s, loss finite,
     non-finite steps = scaler overflows, skipped and counted once); an injected overflow is skipped once,
     counted once and halves the scale;
  5. MoCo v3 with ViT-S/16 (stop_grad_conv1, AdamW, bf16, 224 px): the step (forward of both views through both
     encoders, gathered-keys loss, backward, guard, fused AdamW) without a host sync and its images/s, then a
     short `--recipe moco_v3 --arch vit_small` training run under torchrun (DALI, asymmetric augmentation).

    python bench/gpu_check.py [--seconds 30] [--steps 60] [--batch-size 128]

Without a GPU it exits at once (status 3) with a message. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def check_step_has_no_host_sync(batch_size: int, precision: str = "bf16") -> str:
    """Run MoCo steps with CUDA sync debugging set to error: any host-device sync raises."""
    import torch

    from mocostream.moco_core import MoCo, NonFiniteGuard, build_encoder, build_optimizer, info_nce
    from mocostream.ops.precision import StepPrecision

    device = torch.device("cuda", 0)
    model = MoCo(build_encoder("resnet50"), K=65536, m=0.999, T=0.2, mlp=True).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, 0.03)
    params = [p for p in model.parameters() if p.requires_grad]
    guard = NonFiniteGuard(device, 10)
    amp = StepPrecision(precision, device)
    x_q = torch.randn(batch_size, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    x_k = torch.randn_like(x_q)

    def step():
        with amp.autocast():
            logits, labels = model(x_q, x_k)
            loss = info_nce(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        amp.backward_and_step(loss, opt, guard, params)  # the trainer's own step

    step()  # warm-up: allocations and cuDNN plans may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    except RuntimeError as e:
        return f"host sync in the step: {e}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return "none"


def check_vit_step(batch_size: int, steps: int = 10) -> dict:
    """MoCo v3 steps of ViT-S/16 at 224 px (the reference's model, MLP width 4096), bf16: no host sync in the
    step (sync debug mode "error"), and the step's images/s."""
    import torch

    from mocostream.moco_core import MoCoV3, NonFiniteGuard, build_encoder, build_optimizer
    from mocostream.ops.precision import StepPrecision

    device = torch.device("cuda", 0)
    model = MoCoV3(build_encoder("vit_small", 224, stop_grad_conv1=True), dim=256, mlp_dim=4096, T=0.2).to(device)
    opt = build_optimizer(model, 1.5e-4 * batch_size / 256, weight_decay=0.1, name="adamw")
    params = [p for p in model.parameters() if p.requires_grad]
    guard, amp = NonFiniteGuard(device, 10), StepPrecision("bf16", device)
    x1 = torch.randn(batch_size, 3, 224, 224, device=device)
    x2 = torch.randn_like(x1)

    def step():
        with amp.autocast():
            loss = model(x1, x2, 0.99)
        opt.zero_grad(set_to_none=True)
        amp.backward_and_step(loss, opt, guard, params)  # the trainer's own step
        return loss

    step()  # warm-up: allocations and kernel choices may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        sync = "none"
    except RuntimeError as e:
        sync = f"host sync in the step: {e}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    rate = steps * batch_size / (time.perf_counter() - t0)
    enc = model.base_encoder
    frozen = not enc.patch_embed.proj.weight.requires_grad and not enc.pos_embed.requires_grad
    return {"vit_s16_host_syncs_in_step": sync, "vit_s16_step_images_per_s": round(rate, 1),
            "vit_s16_loss": float(loss), "vit_s16_frozen_parts": frozen,
            "vit_s16_backbone_params": sum(p.numel() for n, p in model.base_encoder.named_parameters()
                                           if not n.startswith("head."))}


def check_fp16_overflow(device_name: str = "cuda") -> dict:
    """An fp16 overflow on the GPU: skipped once, counted once, the scale halved; the next step trains."""
    import torch

    from mocostream.moco_core import NonFiniteGuard, build_optimizer
    from mocostream.ops.precision import StepPrecision, precision_mode

    device = torch.device(device_name, 0) if device_name == "cuda" else torch.device(device_name)
    net = torch.nn.Linear(64, 8).to(device)
    opt, guard, amp = build_optimizer(net, 0.1), NonFiniteGuard(device, 10), StepPrecision("fp16", device)
    w0, scale = net.weight.detach().clone(), amp.scaler.get_scale()
    results = []
    for value in (1e3, 1e-3):  # the first overflows fp16 once scaled; the second does not
        with amp.autocast():
            loss = net(torch.full((32, 64), value, device=device)).float().mean()
        opt.zero_grad(set_to_none=True)
        amp.backward_and_step(loss, opt, guard, list(net.parameters()))
        results.append((guard.check(), amp.scaler.get_scale(), bool(torch.equal(net.weight, w0))))
    ok = results == [(1, scale / 2, True), (0, scale / 2, False)]
    return {"fp16_overflow_check": "ok" if ok else f"mismatch: {results}",
            "auto_precision": precision_mode("auto", device),
            "bf16_supported": device.type == "cuda" and torch.cuda.is_bf16_supported()}


def train_run(work: Path, args, precision: str, steps: int, recipe: str = "moco_v2",
              arch: str = "resnet50") -> dict:
    """A short `mocostream train` under torchrun (1 process, NCCL); its summary JSON, or {"error": rc}."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--master-port=29533",
           "-m", "mocostream.ops.cli", "train", "--data", str(work / "shards"), "--steps", str(steps),
           "--batch-size", str(args.batch_size), "--arch", arch, "--image-size", "224",
           "--backend", "dali", "--recipe", recipe, "--device", "cuda", "--metrics-port", "0",
           "--checkpoint-dir", str(work / f"ckpt-{recipe}-{arch}-{precision}"), "--checkpoint-every", str(steps),
           "--no-progress", "--log-every", "10", "--workers", str(min(8, os.cpu_count() or 1)),
           "--precision", precision]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        print(out.stdout[-4000:], out.stderr[-4000:])
        return {"error": out.returncode}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", help="folder of real photos (default: 2,000 generated 480x360 images)")
    args = p.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); nothing to check here.")
        return 3
    from mocostream.ops.demo import write_images
    from mocostream.pipeline.loader import LoaderConfig, TwoViewLoader
    from mocostream.shards.create import create_shards

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    images = args.images
    if images is None:
        images = str(work / "images")
        write_images(Path(images), per_class=250, size=480)
    create_shards([images], str(work / "shards"), fmt="tar", samples_per_shard=250, progress=False)
    report = {"gpu": torch.cuda.get_device_name(0)}

    loader = TwoViewLoader(LoaderConfig(data=str(work / "shards"), batch_size=args.batch_size, image_size=224,
                                        recipe="moco_v2", backend="dali", device="gpu", device_id=0,
                                        workers=min(8, os.cpu_count() or 1)))
    it = iter(loader)
    b = next(it)
    assert b.q.is_cuda and b.q.shape == (args.batch_size, 3, 224, 224), (b.q.device, b.q.shape)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        b = next(it)
        n += len(b.keys)
    torch.cuda.synchronize()
    report["loader_images_per_s"] = round(n / (time.perf_counter() - t0), 1)
    it.close()
    print(f"loader (DALI mixed decode + GPU aug, 224 px, v2): {report['loader_images_per_s']} images/s", flush=True)

    summary = train_run(work, args, "bf16", args.steps)
    if "error" in summary:
        report["train_error"] = summary["error"]
        print(json.dumps(report))
        return 1
    report.update(train_images_per_s=round(summary["images_per_second"], 1),
                  data_wait_share=round(summary["data_wait_share"], 3), final_loss=summary["loss"],
                  steps=summary["step"])
    print(f"training (ResNet-50, NCCL, bf16, channels_last, batch {args.batch_size}): "
          f"{report['train_images_per_s']} images/s, data wait {report['data_wait_share']:.1%} of step time")
    report["host_syncs_in_step"] = check_step_has_no_host_sync(min(args.batch_size, 64))
    print(f"host syncs in the MoCo step: {report['host_syncs_in_step']}")

    fp16 = train_run(work, args, "fp16", max(20, args.steps // 2))
    if "error" in fp16:
        report["fp16_train_error"] = fp16["error"]
    else:
        report.update(fp16_train_images_per_s=round(fp16["images_per_second"], 1), fp16_final_loss=fp16["loss"],
                      fp16_nonfinite_steps=fp16["nonfinite_steps"])
    report["host_syncs_in_fp16_step"] = check_step_has_no_host_sync(min(args.batch_size, 64), "fp16")
    report.update(check_fp16_overflow())
    print(f"fp16 + grad scaler: {report.get('fp16_train_images_per_s')} images/s, "
          f"{report.get('fp16_nonfinite_steps')} overflow steps skipped, host syncs: "
          f"{report['host_syncs_in_fp16_step']}, injected overflow: {report['fp16_overflow_check']}, "
          f"auto picks {report['auto_precision']}")
    vit_ok = check_vit(work, args, report)
    print(json.dumps(report))
    fp16_ok = ("fp16_train_error" not in report and report["host_syncs_in_fp16_step"] == "none"
               and report["fp16_overflow_check"] == "ok" and math.isfinite(report["fp16_final_loss"])
               and report["auto_precision"] == ("bf16" if report["bf16_supported"] else "fp16"))
    return 0 if report["host_syncs_in_step"] == "none" and fp16_ok and vit_ok else 1


def check_vit(work: Path, args, report: dict) -> bool:
    """Step 5: the ViT-S/16 MoCo v3 step and a short training run; whether both passed."""
    report.update(check_vit_step(min(args.batch_size, 128)))
    v3 = train_run(work, args, "bf16", max(20, args.steps // 2), recipe="moco_v3", arch="vit_small")
    if "error" in v3:
        report["vit_s16_train_error"] = v3["error"]
    else:
        report.update(vit_s16_train_images_per_s=round(v3["images_per_second"], 1), vit_s16_final_loss=v3["loss"],
                      vit_s16_data_wait_share=round(v3["data_wait_share"], 3))
    print(f"MoCo v3 ViT-S/16 (bf16, AdamW): step {report['vit_s16_step_images_per_s']} images/s, host syncs: "
          f"{report['vit_s16_host_syncs_in_step']}; training {report.get('vit_s16_train_images_per_s')} images/s, "
          f"loss {report.get('vit_s16_final_loss')}", flush=True)
    return (report["vit_s16_host_syncs_in_step"] == "none" and report["vit_s16_frozen_parts"]
            and "vit_s16_train_error" not in report and math.isfinite(report["vit_s16_final_loss"])
            and abs(report["vit_s16_backbone_params"] - 21.7e6) < 0.1e6)


if __name__ == "__main__":
    sys.exit(main())
