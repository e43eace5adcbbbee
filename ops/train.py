"""The training job: one process per rank (plain `python`, or `torchrun --nproc_per_node N`).

Per step: wait for a (q, k) batch -> MoCo forward/backward/SGD step -> metrics. Checkpoints every
`checkpoint_every` steps, at the end, and on SIGTERM (then exit 0), so preemption loses nothing.
The step itself never waits for the GPU: loss, accuracy, gradient norm and the non-finite count are
read at log steps only, a non-finite step is skipped on the device, and stop flags travel over gloo.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from moco_core import (LR_SCHEDULES, MoCo, NonFiniteGuard, backbone_of, budget_lr, build_encoder, build_optimizer,
                       info_nce, instance_accuracy, momentum_at, scaled_lr)
from pipeline.labeled import knn_sets
from pipeline.loader import TwoViewLoader
from pipeline.storage import at_start, retrying

from . import checkpoint
from .config import ConfigError, TrainConfig, mask_secrets, mask_text
from .evaluate import knn_eval
from .metrics import TrainMetrics
from .pipeline_configs import loader_config, storage_config
from .precision import StepPrecision, precision_mode
from .ranks import on_one_rank
from .weights import init_backbones

log = logging.getLogger("mocostream.train")


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.set = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        log.warning("signal %d received: checkpointing and stopping", signum)
        self.set = True

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, int, torch.device]:
    """(rank, world, local_rank, device), initialising torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():  # under torchrun, even with one process
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=10))
    return rank, world, local_rank, device


def auto_bn_splits(cfg: TrainConfig, world: int) -> int:
    """Shuffle BN needs >1 BN groups: ranks under DDP, sub-batches on a single device. Sub-batches of
    at least 32 (the paper's per-GPU batch; BN over fewer samples is noisy and slows learning), as many as
    8; a small batch still gets 2 groups rather than none."""
    if cfg.bn_splits > 0:
        return cfg.bn_splits
    if world > 1:
        return 1
    for splits in (8, 4, 2):
        if cfg.batch_size % splits == 0 and cfg.batch_size // splits >= 32:
            return splits
    return 2 if cfg.batch_size % 2 == 0 and cfg.batch_size >= 8 else 1


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather(obj, world: int) -> list | None:
    """Every rank's `obj` on rank 0 (None elsewhere): a checkpoint needs them there only."""
    if world == 1:
        return [obj]
    out = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class KnnMonitor:
    """The weighted kNN monitor of the reference CIFAR demo, on rank 0: labelled images are decoded once,
    features come from the query encoder's backbone in eval mode."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.bank, self.queries = knn_sets(cfg.knn_data, cfg.knn_image_size or cfg.image_size, cfg.knn_max_per_class)
        self.k, self.t, self.device = cfg.knn_k, cfg.knn_t, device
        log.info("kNN monitor: %d labelled images, %d queries, %d classes", len(self.bank), len(self.queries),
                 len(self.bank.classes))

    def __call__(self, model: MoCo) -> float:
        return knn_eval(backbone_of(model.encoder_q), self.bank, self.queries, self.device, self.k, self.t)


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast (with channels_last): by default on CUDA GPUs that support it; on request on CPU, where
    oneDNN runs it on AMX/AVX512-BF16 at about twice the fp32 speed (and emulates it, slowly, elsewhere)."""
    return precision_mode(cfg.precision, device) == "bf16"


def build_model(cfg: TrainConfig, world: int, device: torch.device) -> MoCo:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = MoCo(build_encoder(cfg.arch), dim=cfg.dim, K=cfg.queue_size, m=cfg.moco_momentum,
                 T=cfg.temperature, mlp=cfg.mlp, bn_splits=auto_bn_splits(cfg, world), symmetric=cfg.symmetric)
    if cfg.sync_bn:
        if device.type != "cuda" or world < 2:
            raise ConfigError("--sync-bn needs CUDA and several ranks (one device uses split-batch Shuffle BN)")
        # the query encoder only: the key encoder keeps Shuffle BN, which is what stops BN leakage
        model.encoder_q = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_q)
    model = model.to(device)
    if StepPrecision(cfg.precision, device).channels_last:  # bf16/fp16: oneDNN and cuDNN are fastest in NHWC
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.encoder_q.compile()  # in place: parameter names and checkpoints stay the same
        model.encoder_k.compile()
    return model


def check_checkpoint_dir(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """At start, not at the first checkpoint: a fresh run never writes into a folder holding another run's
    checkpoints (its retention, or a later --resume, would mix the two runs), and the folder must take a
    write of about a checkpoint's size (model + optimizer momentum + slack)."""
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    checkpoint.check_writable(cfg.checkpoint_dir, 2 * state_bytes + (1 << 20))
    if not cfg.resume:
        existing = checkpoint.list_checkpoints(cfg.checkpoint_dir)
        if existing:
            raise checkpoint.CheckpointError(
                f"{cfg.checkpoint_dir} already holds checkpoints of a run (latest: step "
                f"{checkpoint.step_of(existing[-1])}); give --resume to continue it, or another --checkpoint-dir")


def load_model_state(model: MoCo, state: dict, path: str, cfg: TrainConfig) -> None:
    """The checkpoint's weights, or a one-line error when they belong to another model."""
    saved = state.get("config") or {}
    if saved.get("arch", cfg.arch) != cfg.arch:
        raise ConfigError(f"{path} was trained with --arch {saved['arch']}, not {cfg.arch}: resume with the "
                          "same architecture, or use another --checkpoint-dir")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # shapes differ: --dim, --mlp, --queue-size ...
        raise ConfigError(f"{path} does not fit this model (another --dim, --mlp or --queue-size?): "
                          f"{checkpoint.first_line(e)}") from None


def trace_lines(keys) -> str:
    """One line per key: a newline (or backslash) inside a key is escaped, so every line is one key."""
    return "".join(str(k).replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r") + "\n" for k in keys)


def roll_back_traces(cfg: TrainConfig, state: dict, rank: int) -> None:
    """Cut this rank's key and loss traces back to what the checkpoint covers: steps done after it (by a run
    killed with -9) are trained again, so without this their keys would appear twice."""
    offsets = state.get("trace") or []
    same_trace = (state.get("config") or {}).get("trace_keys") == mask_text(cfg.trace_keys or "")
    if not cfg.trace_keys or not same_trace or rank >= len(offsets) or offsets[rank] is None:
        return  # another trace path than the checkpointed run's: not its file to cut
    for path, offset in zip((f"{cfg.trace_keys}.rank{rank}", f"{cfg.trace_keys}.rank{rank}.loss"), offsets[rank]):
        if os.path.exists(path) and os.path.getsize(path) > offset:
            log.warning("%s: %d bytes written after the checkpoint removed (those steps run again)",
                        path, os.path.getsize(path) - offset)
            os.truncate(path, offset)


def train(cfg: TrainConfig) -> dict:
    rank, world, local_rank, device = setup_distributed(cfg)
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    is_main = rank == 0

    metrics = TrainMetrics(rank)
    storage = storage_config(cfg)
    at_start(storage, cfg.allow_external_shards)  # start-up storage calls: timeouts, bounded retries
    loader = retrying(storage, cfg.data, lambda: TwoViewLoader(
        loader_config(cfg, storage, rank, world, device, local_rank), observer=metrics, share=on_one_rank))

    model = build_model(cfg, world, device)
    check_checkpoint_dir(cfg, model)
    if cfg.init_from and not (cfg.resume and checkpoint.latest(cfg.checkpoint_dir)):  # a resumed run has its own
        init_backbones(model, cfg.init_from, cfg.arch)
    # Buffers are synced once at start; after that the queue stays identical on every rank (keys are
    # all-gathered), so the 32 MB queue is not re-broadcast every step.
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False) \
        if dist.is_initialized() else model
    peak_lr = scaled_lr(cfg.base_lr, cfg.batch_size * world)
    optimizer = build_optimizer(model, peak_lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    guard = NonFiniteGuard(device, cfg.max_nonfinite_steps)
    amp = StepPrecision(cfg.precision, device)  # fp32, bf16 autocast, or fp16 autocast + gradient scaler
    lr_at = LR_SCHEDULES[cfg.lr_schedule]
    knn = KnnMonitor(cfg, device) if cfg.knn_data and is_main else None
    knn_value = None
    # Stop/exhausted flags go over gloo on the CPU, so agreeing on them never waits for the GPU.
    control = dist.new_group(backend="gloo") if dist.is_initialized() and device.type == "cuda" else None

    step = 0
    # A time-boxed run (--budget-minutes) counts the seconds spent in the training loop over all resumes;
    # its schedules follow them instead of the step count, and it ends when they reach the budget.
    budget_s = 60 * cfg.budget_minutes if cfg.budget_minutes else None
    max_steps = cfg.steps or math.inf
    seconds_before = 0.0  # trained by earlier runs of this job
    if cfg.resume:
        path, state = checkpoint.load_latest_intact(cfg.checkpoint_dir)
        if path is None:
            log.warning("--resume: no checkpoint in %s, starting fresh", cfg.checkpoint_dir)
        else:
            load_model_state(model, state, path, cfg)
            optimizer.load_state_dict(state["optimizer"])
            amp.load_state_dict(state.get("grad_scaler"))
            step = int(state["step"])
            seconds_before = float(state.get("train_seconds", 0.0))
            loader.load_states(state["loader"])  # another number of ranks: what is left is re-split
            if int(state["world"]) == world:
                set_rng_state(state["rng"][rank])
            elif is_main:
                log.warning("resumed with %d ranks (checkpoint had %s): the global batch is now %d",
                            world, state["world"], cfg.batch_size * world)
            if is_main:
                log.info("resumed from %s at step %d", path, step)
            roll_back_traces(cfg, state, rank)

    metrics_port = None
    if cfg.metrics_port:
        metrics_port = metrics.serve(cfg.metrics_port + local_rank, cfg.metrics_addr)
        log.info("rank %d metrics on http://%s:%d/metrics", rank, cfg.metrics_addr, metrics_port)

    # Line-buffered: what a rank consumed is on disk when the step ends, even if the process is killed.
    trace = open(f"{cfg.trace_keys}.rank{rank}", "a", buffering=1) if cfg.trace_keys else None
    loss_trace = open(f"{cfg.trace_keys}.rank{rank}.loss", "a", buffering=1) if cfg.trace_keys else None
    stop = StopFlag()
    # A progress bar on a terminal; the compact log line every --log-every steps everywhere.
    bar = tqdm(total=cfg.steps, initial=step, disable=not (is_main and cfg.progress and sys.stderr.isatty()),
               unit="step", dynamic_ncols=True, desc="train")
    # Agreeing on a stop costs a collective: every step on CPU, every 10 on GPU, and every step when
    # --epochs can run a rank's stream dry (all ranks must then stop at the same step).
    stop_check_every = 1 if device.type == "cpu" or cfg.epochs else 10

    def save(reason: str) -> str | None:
        states = gather({"loader": loader.position_state(), "rng": rng_state(),
                         "trace": (trace.tell(), loss_trace.tell()) if trace else None}, world)
        path = None
        if is_main:
            t0 = time.perf_counter()
            path = checkpoint.save(cfg.checkpoint_dir, step, {
                "step": step, "train_seconds": trained, "world": world, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "grad_scaler": amp.state_dict(),
                "loader": loader.checkpoint_state([s["loader"] for s in states]), "rng": [s["rng"] for s in states],
                "trace": [s["trace"] for s in states],
                "config": mask_secrets(dataclasses.asdict(cfg))}, keep=cfg.keep_checkpoints)
            metrics.checkpoint_seconds.labels(str(rank)).observe(time.perf_counter() - t0)
            log.info("checkpoint (%s) at step %d: %s", reason, step, path)
        if trace:
            trace.flush()
            loss_trace.flush()
        if world > 1:
            dist.barrier()
        return path

    ddp.train()
    batches = iter(loader)
    last_log_time, last_log_step = time.perf_counter(), step
    loss_value, acc_value, stopped = float("nan"), float("nan"), False
    last_checkpoint = None
    t_end = t_start = time.perf_counter()
    wait_total, samples_total, start_step = 0.0, 0, step
    trained = seconds_before  # agreed by all ranks (the slowest clock), so they change lr and stop together
    nonfinite_total = 0

    def run_knn() -> float:
        t0 = time.perf_counter()
        value = knn(model)
        metrics.record_knn(value, time.perf_counter() - t0)
        log.info("step %d: kNN top-1 %.2f%% (%.1f s)", step, 100 * value, time.perf_counter() - t0)
        return value

    redirect = logging_redirect_tqdm() if not bar.disable else nullcontext()
    redirect.__enter__()
    try:
        while step < max_steps:
            batch = next(batches, None)
            t_data = time.perf_counter()
            exhausted = batch is None
            if world == 1:
                trained = seconds_before + t_data - t_start
            elif step % stop_check_every == 0 or exhausted:
                flags = torch.tensor([float(stop.set), float(exhausted), seconds_before + t_data - t_start],
                                     dtype=torch.float64, device="cpu" if control else device)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=control)
                stop.set, exhausted, trained = bool(flags[0] > 0), bool(flags[1] > 0), float(flags[2])
            # A run (or resumed segment) whose budget is not yet spent trains at least one step, however slow
            # its start-up was, so a time-boxed run always leaves a model and a checkpoint behind.
            if budget_s and trained >= budget_s and (step > start_step or seconds_before >= budget_s):
                if is_main:
                    log.info("budget of %g minutes reached at step %d", cfg.budget_minutes, step)
                break
            if exhausted:  # --epochs done on some rank: every rank ends at this same step
                log.info("rank %d: data exhausted after %d epochs at step %d", rank, cfg.epochs, step)
                break
            if stop.set or (cfg.stop_after is not None and step - start_step >= cfg.stop_after):
                stopped = True
                break
            im_q = batch.q.to(device, non_blocking=True)
            im_k = batch.k.to(device, non_blocking=True)
            if amp.channels_last:
                im_q = im_q.contiguous(memory_format=torch.channels_last)
                im_k = im_k.contiguous(memory_format=torch.channels_last)
            if budget_s:
                spent = min(trained, budget_s)  # the one step a slow start may take past the budget
                lr = budget_lr(peak_lr, cfg.lr_schedule, step, cfg.warmup_steps, spent / budget_s)
                model.m = momentum_at(cfg.moco_momentum, spent, budget_s, cfg.momentum_schedule)
            else:
                lr = lr_at(peak_lr, step, cfg.steps, cfg.warmup_steps)
                model.m = momentum_at(cfg.moco_momentum, step, cfg.steps, cfg.momentum_schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with amp.autocast():
                logits, labels = ddp(im_q, im_k)
                # symmetric: the two directions' losses are summed, as in the reference CIFAR demo
                loss = info_nce(logits.float(), labels) * (2 if cfg.symmetric else 1)
            optimizer.zero_grad(set_to_none=True)
            amp.backward_and_step(loss, optimizer, guard, trainable)  # a non-finite step: skipped on the device
            loader.consumed(batch)  # only now: a batch fetched but not trained on is not lost on resume
            step += 1
            if trace:
                trace.write(trace_lines(batch.keys))
            t_step_end = time.perf_counter()
            metrics.record_step(len(batch.keys), t_step_end - t_end, t_data - t_end)
            wait_total += t_data - t_end
            samples_total += len(batch.keys)
            t_end = t_step_end
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                loss_value = loss.item()  # the host syncs: at log steps only
                acc_value = instance_accuracy(logits).item()
                nonfinite = guard.check()  # raises after --max-nonfinite-steps in a row
                nonfinite_total += nonfinite
                grad_norm = guard.grad_norm.item()
                now = time.perf_counter()
                ips = (step - last_log_step) * cfg.batch_size / max(now - last_log_time, 1e-9)
                last_log_time, last_log_step = now, step
                epoch, progress = loader.epoch_progress
                metrics.record_log(step=step, loss=loss_value, lr=lr, accuracy=acc_value, images_per_second=ips,
                                   epoch=epoch, epoch_progress=progress, grad_norm=grad_norm, momentum=model.m,
                                   nonfinite=nonfinite)
                metrics.sync_skipped(loader.skipped)
                if loss_trace:
                    loss_trace.write(f"{step} {loss_value!r}\n")
                bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{ips * world:.1f}", refresh=False)
                if is_main:
                    elapsed = now - t_start
                    eta = min((max_steps - step) * elapsed / max(1, step - start_step),
                              budget_s - trained if budget_s else math.inf)
                    log.info("step %d%s | %.1f img/s | data wait %.0f%% | loss %.4f | lr %.4g | acc %.2f | "
                             "gnorm %.3g%s | ETA %s", step, f"/{cfg.steps}" if cfg.steps else "", ips * world,
                             100 * wait_total / max(elapsed, 1e-9),
                             loss_value, lr, acc_value, grad_norm,
                             f" | non-finite {nonfinite}" if nonfinite else "", format_duration(eta))
            if knn and cfg.knn_every and step % cfg.knn_every == 0 and step < max_steps:
                knn_value = run_knn()
            if step % cfg.checkpoint_every == 0 and step < max_steps:
                last_checkpoint = save("periodic")
        if step > start_step and step != last_log_step:  # a run cut between log steps reports its last step
            loss_value, acc_value = loss.item(), instance_accuracy(logits).item()
        last_checkpoint = save("stop" if stopped else "final") or last_checkpoint
        if knn and not stopped:
            knn_value = run_knn()
    finally:
        redirect.__exit__(None, None, None)
        bar.close()
        batches.close()  # stops reader threads and augmentation workers
        stop.restore()
        if trace:
            trace.close()
            loss_trace.close()
        metrics.sync_skipped(loader.skipped)
    elapsed = time.perf_counter() - t_start
    summary = {"step": step, "steps_run": step - start_step, "seconds": elapsed, "train_seconds": trained,
               "images_per_second": samples_total * world / max(elapsed, 1e-9),
               "data_wait_share": wait_total / max(elapsed, 1e-9), "stopped": stopped, "loss": loss_value,
               "instance_accuracy": acc_value,
               "checkpoint": last_checkpoint, "metrics_port": metrics_port, "skipped": dict(loader.skipped),
               "knn_top1": knn_value, "nonfinite_steps": nonfinite_total,
               "rank": rank, "world": world}
    summary["_metrics"] = metrics
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary
