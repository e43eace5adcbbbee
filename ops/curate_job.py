"""Running `mocostream curate`: the process group, the CPU budget, the embedder's weights and the metrics
endpoint around the stages of curate/ (which take what they need as arguments)."""
from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from mocostream.curate.cluster import ClusterConfig, cluster
from mocostream.curate.embed import EmbedConfig, embed
from mocostream.curate.levels import parse_levels
from mocostream.curate.select import SelectConfig, select

from .cpu_budget import detect_budget, split_threads
from .metrics import EmbedMetrics
from .storage_flags import storage_from_args
from .weights import load_frozen_backbone

log = logging.getLogger("mocostream.curate")


def start(device: str) -> torch.device:
    """The device; under torchrun also the process group, with a timeout long enough for rank 0 to fit the
    tree while the others wait."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=12))
    return dev


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _threads(device: torch.device, workers: int | None) -> int:
    """Decode workers from the rank's CPU budget (as eval and train split it); torch's threads set to match."""
    split = split_threads(detect_budget(), device.type == "cuda", loader=workers)
    torch.set_num_threads(split.intra_op)
    return split.loader


def run_embed(args, device: torch.device) -> dict:
    storage = storage_from_args(args)
    backbone, info = load_frozen_backbone(args.embed_with, args.arch, storage=storage)
    backbone.to(device)
    size = args.image_size or (32 if "_cifar" in info["arch"] else 224)
    cfg = EmbedConfig(args.data, args.out, size, args.batch_size, _threads(device, args.workers))
    metrics = EmbedMetrics(int(os.environ.get("RANK", "0")))
    if args.metrics_port is not None:
        port = metrics.serve(args.metrics_port + int(os.environ.get("LOCAL_RANK", "0")), args.metrics_addr)
        log.info("embed metrics on http://%s:%d/metrics", args.metrics_addr, port)
    try:
        return embed(cfg, backbone, info, device, storage=storage, observer=metrics)
    finally:
        metrics.stop()


def _faiss_threads() -> None:
    import faiss

    faiss.omp_set_num_threads(detect_budget().cpus)


def run_cluster(args) -> dict:
    _faiss_threads()
    cfg = ClusterConfig(args.out, parse_levels(args.levels) if args.levels else None, args.cluster_size,
                        args.level_ratio, args.max_levels, args.fit_sample, args.iterations, args.seed)
    return cluster(cfg, storage=storage_from_args(args))


def run_select(args) -> dict | None:
    """On every rank (each does its share); rank 0 returns the summary and materialises, the others None."""
    cfg = SelectConfig(args.out, args.keep_fraction, args.target_size, args.dedup_eps, args.seed, args.select_memory,
                       args.work_dir)
    storage = storage_from_args(args)
    report = select(cfg, storage=storage)
    if report is None:
        return None
    summary = {k: v for k, v in report.items() if not k.startswith(("cluster_sizes", "coarsest"))}
    if args.materialise:
        from mocostream.curate.materialise import materialise

        summary["materialised"] = materialise(args.out, args.materialise_format, args.samples_per_shard,
                                              storage=storage)
    return summary
