"""GPU readiness check, one prepared script for a machine with an NVIDIA GPU (under 5 minutes):

  1. DALI `mixed` (nvJPEG) decode + GPU two-view augmentation: loader images/s at 224 px;
  2. a short MoCo v2 training run, ResNet-50, NCCL on one GPU (torchrun, 1 process), bf16 autocast
     and channels_last: training images/s and the share of step time spent waiting for data;
  3. the MoCo step (forward, loss, backward, non-finite guard, fused SGD) under
     `torch.cuda.set_sync_debug_mode("error")`: it must not synchronise with the host.

    python bench/gpu_check.py [--seconds 30] [--steps 60] [--batch-size 128]

Without a GPU it exits at once (status 3) with a message. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def check_step_has_no_host_sync(batch_size: int) -> str:
    """Run MoCo steps with CUDA sync debugging set to error: any host-device sync raises."""
    import torch

    from moco_core import MoCo, NonFiniteGuard, build_encoder, build_optimizer, info_nce

    device = torch.device("cuda", 0)
    model = MoCo(build_encoder("resnet50"), K=65536, m=0.999, T=0.2, mlp=True).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, 0.03)
    params = [p for p in model.parameters() if p.requires_grad]
    guard = NonFiniteGuard(device, 10)
    x_q = torch.randn(batch_size, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    x_k = torch.randn_like(x_q)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, labels = model(x_q, x_k)
            loss = info_nce(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        guard.before_step(opt, params)
        opt.step()

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
    from ops.demo import write_images
    from pipeline.loader import LoaderConfig, TwoViewLoader
    from shards.create import create_shards

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

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--master-port=29533",
           "-m", "ops.cli", "train", "--data", str(work / "shards"), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--arch", "resnet50", "--image-size", "224",
           "--backend", "dali", "--recipe", "moco_v2", "--device", "cuda", "--metrics-port", "0",
           "--checkpoint-dir", str(work / "ckpt"), "--checkpoint-every", str(args.steps), "--no-progress",
           "--log-every", "10", "--workers", str(min(8, os.cpu_count() or 1))]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        print(out.stdout[-4000:], out.stderr[-4000:])
        report["train_error"] = out.returncode
        print(json.dumps(report))
        return 1
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    report.update(train_images_per_s=round(summary["images_per_second"], 1),
                  data_wait_share=round(summary["data_wait_share"], 3), final_loss=summary["loss"],
                  steps=summary["step"])
    print(f"training (ResNet-50, NCCL, bf16, channels_last, batch {args.batch_size}): "
          f"{report['train_images_per_s']} images/s, data wait {report['data_wait_share']:.1%} of step time")
    report["host_syncs_in_step"] = check_step_has_no_host_sync(min(args.batch_size, 64))
    print(f"host syncs in the MoCo step: {report['host_syncs_in_step']}")
    print(json.dumps(report))
    return 0 if report["host_syncs_in_step"] == "none" else 1


if __name__ == "__main__":
    sys.exit(main())
