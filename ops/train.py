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
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mocostream.moco_core import (LR_SCHEDULES, MoCo, MoCoV3, NonFiniteGuard, backbone_of, budget_lr, build_encoder,
                                  build_optimizer, info_nce, instance_accuracy, is_vit, momentum_at, scaled_lr)
from mocostream.moco_core.distributed import on_rank0
from mocostream.pipeline.interrupt import Interrupted
from mocostream.pipeline.labeled import knn_sets
from mocostream.pipeline.loader import Batch, TwoViewLoader
from mocostream.pipeline.filesystems import Storage

from . import checkpoint
from .config import ConfigError, TrainConfig, mask_secrets, mask_text
from .cpu_threads import apply_cpu_budget, log_cpu_budget
from .evaluate import knn_eval
from .metrics import TrainMetrics
from .pipeline_configs import loader_config, storage_config
from .precision import StepPrecision, precision_mode
from .weights import encoder_of, init_backbones

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

    def __init__(self, cfg: TrainConfig, device: torch.device, storage: Storage):
        self.bank, self.queries = knn_sets(cfg.knn_data, cfg.knn_image_size or cfg.image_size, cfg.knn_max_per_class,
                                           storage=storage)
        self.k, self.t, self.device = cfg.knn_k, cfg.knn_t, device
        log.info("kNN monitor: %d labelled images, %d queries, %d classes", len(self.bank), len(self.queries),
                 len(self.bank.classes))

    def __call__(self, model: MoCo | MoCoV3) -> float:
        return knn_eval(backbone_of(encoder_of(model)), self.bank, self.queries, self.device, self.k, self.t)


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast (with channels_last): by default on CUDA GPUs that support it; on request on CPU, where
    oneDNN runs it on AMX/AVX512-BF16 at about twice the fp32 speed (and emulates it, slowly, elsewhere)."""
    return precision_mode(cfg.precision, device) == "bf16"


def build_v3(cfg: TrainConfig, world: int, device: torch.device) -> MoCoV3:
    """MoCo v3 as the reference builds it: ViTs with stop_grad_conv1, ResNets with zero-initialised residual
    branches; under DDP on GPUs every BN becomes SyncBatchNorm (statistics over the global batch of a view)."""
    options = {"stop_grad_conv1": cfg.stop_grad_conv1} if is_vit(cfg.arch) else {"zero_init_residual": True}
    model = MoCoV3(build_encoder(cfg.arch, cfg.image_size, **options), dim=cfg.dim, mlp_dim=cfg.mlp_dim,
                   T=cfg.temperature)
    if world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif world > 1:  # SyncBatchNorm has no CPU kernel
        log.info("moco_v3 on CPU ranks: BN statistics per rank's share of each view (no SyncBatchNorm on CPU)")
    return model


def build_model(cfg: TrainConfig, world: int, device: torch.device) -> MoCo | MoCoV3:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    if cfg.recipe == "moco_v3":
        model = build_v3(cfg, world, device)
    else:
        model = MoCo(build_encoder(cfg.arch, cfg.image_size), dim=cfg.dim, K=cfg.queue_size, m=cfg.moco_momentum,
                     T=cfg.temperature, mlp=cfg.mlp, bn_splits=auto_bn_splits(cfg, world), symmetric=cfg.symmetric)
    if cfg.sync_bn and cfg.recipe != "moco_v3":
        if device.type != "cuda" or world < 2:
            raise ConfigError("--sync-bn needs CUDA and several ranks (one device uses split-batch Shuffle BN)")
        # the query encoder only: the key encoder keeps Shuffle BN, which is what stops BN leakage
        model.encoder_q = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_q)
    model = model.to(device)
    if StepPrecision(cfg.precision, device).channels_last:  # bf16/fp16: oneDNN and cuDNN are fastest in NHWC
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        encoder_of(model, "query").compile()  # in place: parameter names and checkpoints stay the same
        encoder_of(model, "key").compile()
    return model


def check_checkpoint_dir(cfg: TrainConfig, model: torch.nn.Module, storage: Storage) -> None:
    """At start, not at the first checkpoint: a fresh run never writes into a folder holding another run's
    checkpoints (its retention, or a later --resume, would mix the two runs), and the folder must take a
    write of about a checkpoint's size (model + optimizer momentum + slack)."""
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    checkpoint.check_writable(cfg.checkpoint_dir, 2 * state_bytes + (1 << 20), storage=storage)
    if not cfg.resume:
        existing = checkpoint.list_checkpoints(cfg.checkpoint_dir, storage=storage)
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


@dataclass
class TrainState:
    """What the loop carries from step to step. `step` and `trained` go into checkpoints; the rest is this
    run's (or resumed segment's) bookkeeping for the log line and the summary."""
    step: int = 0
    start_step: int = 0  # where this run began: a resumed run starts at the checkpoint's step
    seconds_before: float = 0.0  # training seconds of earlier runs of this job
    trained: float = 0.0  # training seconds over all runs, agreed by all ranks (the slowest clock)
    samples: int = 0  # samples this rank trained on in this run
    wait_seconds: float = 0.0  # time this rank waited for its batches in this run
    nonfinite_steps: int = 0
    lr: float = 0.0
    loss: float = math.nan  # of the latest logged step
    accuracy: float = math.nan
    knn_top1: float | None = None
    checkpoint: str | None = None  # the latest written
    stopped: bool = False  # by a signal or --stop-after
    t_start: float = 0.0  # perf_counter at the loop's start
    t_end: float = 0.0  # ... at the end of the previous step
    last_log_time: float = 0.0
    last_log_step: int = 0


class Trainer:
    """One rank's training job, built from one TrainConfig.

    Everything it opens - process group, batch stream, metrics endpoint, trace files, signal handlers, progress
    bar - is entered on one exit stack as it is opened, so `close()` (or leaving `with Trainer(cfg)`) releases
    it all in reverse order, on every exit path, an exception during start-up included."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self._resources = ExitStack()
        try:
            self._start()
        except BaseException:
            self._resources.close()
            raise

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._resources.close()

    # ---- start-up ------------------------------------------------------------------------------------------
    def _start(self) -> None:
        cfg = self.cfg
        self.rank, self.world, self.local_rank, self.device = setup_distributed(cfg)
        if dist.is_initialized():
            self._resources.callback(dist.destroy_process_group)
        torch.manual_seed(cfg.seed + self.rank)
        random.seed(cfg.seed + self.rank)
        self.is_main = self.rank == 0
        self.metrics = TrainMetrics(self.rank)
        self._resources.callback(self.metrics.stop)
        self.cpu, self.threads, self.tuner = apply_cpu_budget(cfg, on_gpu=self.device.type == "cuda")
        self.metrics.record_cpu(self.cpu.cpus, {"intra_op": self.threads.intra_op, "interop": self.threads.interop,
                                                "loader": self.threads.loader})
        # every read and write of this run (data, kNN set, checkpoints, --init-from) goes through this one
        self.storage = Storage(storage_config(cfg))
        self.loader = self._build_loader()
        # once the data is found: bad input stays one line
        log_cpu_budget(self.cpu, self.threads, self.loader.backend)
        # the skip counters catch up with what the reader threads counted until they stopped
        self._resources.callback(lambda: self.metrics.sync_skipped(self.loader.skipped))
        self._build_model()
        self.state = TrainState()
        if cfg.resume:
            self._resume()
        self._open_outputs()

    def _build_loader(self) -> TwoViewLoader:
        """This rank's (q, k) batches; start-up storage calls get timeouts and bounded retries."""
        cfg, storage = self.cfg, self.storage
        loader_cfg = loader_config(cfg, storage.config, self.rank, self.world, self.device, self.local_rank,
                                   workers=self.threads.loader)
        return storage.retrying(f"read {cfg.data}", lambda: TwoViewLoader(
            loader_cfg, observer=self.metrics, share=on_rank0, storage=storage))

    def _build_model(self) -> None:
        cfg, device = self.cfg, self.device
        self.model = model = build_model(cfg, self.world, device)
        check_checkpoint_dir(cfg, model, self.storage)
        # a resumed run has its own weights
        if cfg.init_from and not (cfg.resume and checkpoint.latest(cfg.checkpoint_dir, storage=self.storage)):
            init_backbones(model, cfg.init_from, cfg.arch, storage=self.storage)
        # Buffers are synced once at start; after that the queue stays identical on every rank (keys are
        # all-gathered), so the 32 MB queue is not re-broadcast every step.
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False) \
            if dist.is_initialized() else model
        self.peak_lr = scaled_lr(cfg.base_lr, cfg.batch_size * self.world)
        self.optimizer = build_optimizer(model, self.peak_lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay,
                                         name=cfg.optimizer)
        self.v3 = isinstance(model, MoCoV3)
        self.moco_m = cfg.moco_momentum
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        # skips non-finite steps and clips the rest to --clip-grad (0: not at all)
        self.guard = NonFiniteGuard(device, cfg.max_nonfinite_steps, clip_norm=cfg.clip_grad)
        self.amp = StepPrecision(cfg.precision, device)  # fp32, bf16 autocast, or fp16 autocast + gradient scaler
        self.knn = KnnMonitor(cfg, device, self.storage) if cfg.knn_data and self.is_main else None
        # Stop/exhausted flags go over gloo on the CPU, so agreeing on them never waits for the GPU.
        self.control = dist.new_group(backend="gloo") if dist.is_initialized() and device.type == "cuda" else None
        # A time-boxed run (--budget-minutes) counts the seconds spent in the training loop over all resumes;
        # its schedules follow them instead of the step count, and it ends when they reach the budget.
        self.budget_s = 60 * cfg.budget_minutes if cfg.budget_minutes else None
        self.max_steps = cfg.steps or math.inf
        # Agreeing on a stop costs a collective: every step on CPU, every 10 on GPU, and every step when
        # --epochs can run a rank's stream dry (all ranks must then stop at the same step).
        self.stop_check_every = 1 if device.type == "cpu" or cfg.epochs else 10

    def _resume(self) -> None:
        cfg, s = self.cfg, self.state
        path, saved = checkpoint.load_latest_intact(cfg.checkpoint_dir, storage=self.storage)
        if path is None:
            log.warning("--resume: no checkpoint in %s, starting fresh", cfg.checkpoint_dir)
            return
        load_model_state(self.model, saved, path, cfg)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.amp.load_state_dict(saved.get("grad_scaler"))
        s.step = s.start_step = int(saved["step"])
        s.seconds_before = s.trained = float(saved.get("train_seconds", 0.0))
        self.loader.load_states(saved["loader"])  # another number of ranks: what is left is re-split
        if int(saved["world"]) == self.world:
            set_rng_state(saved["rng"][self.rank])
        elif self.is_main:
            log.warning("resumed with %d ranks (checkpoint had %s): the global batch is now %d",
                        self.world, saved["world"], cfg.batch_size * self.world)
        if self.is_main:
            log.info("resumed from %s at step %d", path, s.step)
        roll_back_traces(cfg, saved, self.rank)

    def _open_outputs(self) -> None:
        """Metrics endpoint, trace files, signal handlers, progress bar and the batch stream, each on the stack."""
        cfg, enter = self.cfg, self._resources.enter_context
        self.metrics_port = None
        if cfg.metrics_port:
            self.metrics_port = self.metrics.serve(cfg.metrics_port + self.local_rank, cfg.metrics_addr)
            log.info("rank %d metrics on http://%s:%d/metrics", self.rank, cfg.metrics_addr, self.metrics_port)
        # Line-buffered: what a rank consumed is on disk when the step ends, even if the process is killed.
        self.trace = self.loss_trace = None
        if cfg.trace_keys:
            self.trace = enter(open(f"{cfg.trace_keys}.rank{self.rank}", "a", buffering=1))
            self.loss_trace = enter(open(f"{cfg.trace_keys}.rank{self.rank}.loss", "a", buffering=1))
        self.stop = StopFlag()
        self._resources.callback(self.stop.restore)
        self.loader.interrupt_when(lambda: self.stop.set)  # a stop does not wait for late data
        # A progress bar on a terminal; the compact log line every --log-every steps everywhere.
        self.bar = enter(tqdm(total=cfg.steps, initial=self.state.step, unit="step", dynamic_ncols=True, desc="train",
                              disable=not (self.is_main and cfg.progress and sys.stderr.isatty())))
        if not self.bar.disable:
            enter(logging_redirect_tqdm())
        self.batches = iter(self.loader)
        self._resources.callback(self.batches.close)  # stops reader threads and augmentation workers

    # ---- the loop ------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Steps until --steps, --stop-after, the budget, the end of the data or a stop signal; then the last
        checkpoint (and kNN). Returns the run's summary, plain data."""
        cfg, s = self.cfg, self.state
        self.ddp.train()
        s.t_start = s.t_end = s.last_log_time = time.perf_counter()
        s.last_log_step = s.step
        while s.step < self.max_steps:
            batch = self._next_batch()
            t_data = time.perf_counter()
            if self._should_end(batch is None and not self.stop.set, t_data):
                break
            self.train_step(batch, t_data)
            if s.step % cfg.log_every == 0 or s.step == cfg.steps:
                self.log()
            if self.knn and cfg.knn_every and s.step % cfg.knn_every == 0 and s.step < self.max_steps:
                self.run_knn()
            if s.step % cfg.checkpoint_every == 0 and s.step < self.max_steps:
                s.checkpoint = self.checkpoint("periodic")
        if s.step > s.start_step and s.step != s.last_log_step:  # a run cut between log steps reports its last step
            self._read_loss()
        s.checkpoint = self.checkpoint("stop" if s.stopped else "final") or s.checkpoint
        if self.knn and not s.stopped:
            self.run_knn()
        self.batches.close()  # the reader threads stop: the skip counts the summary reports are final
        self.metrics.sync_skipped(self.loader.skipped)
        return self.summary()

    def _next_batch(self) -> Batch | None:
        """The next batch; None at the end of the data, or when a stop signal cut the wait for it short."""
        try:
            return next(self.batches, None)
        except Interrupted:
            log.info("rank %d: stopped while waiting for data", self.rank)
            return None

    def _agree(self, exhausted: bool, t_data: float) -> bool:
        """Training seconds, stop request and end of data, agreed by all ranks; returns `exhausted`."""
        s = self.state
        if self.world == 1:
            s.trained = s.seconds_before + t_data - s.t_start
        elif s.step % self.stop_check_every == 0 or exhausted:
            flags = torch.tensor([float(self.stop.set), float(exhausted), s.seconds_before + t_data - s.t_start],
                                 dtype=torch.float64, device="cpu" if self.control else self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control)
            self.stop.set, exhausted, s.trained = bool(flags[0] > 0), bool(flags[1] > 0), float(flags[2])
        return exhausted

    def _should_end(self, exhausted: bool, t_data: float) -> bool:
        cfg, s = self.cfg, self.state
        exhausted = self._agree(exhausted, t_data)
        # A run (or resumed segment) whose budget is not yet spent trains at least one step, however slow
        # its start-up was, so a time-boxed run always leaves a model and a checkpoint behind.
        if self.budget_s and s.trained >= self.budget_s and (s.step > s.start_step or s.seconds_before >= self.budget_s):
            if self.is_main:
                log.info("budget of %g minutes reached at step %d", cfg.budget_minutes, s.step)
            return True
        if exhausted:  # --epochs done on some rank: every rank ends at this same step
            log.info("rank %d: data exhausted after %d epochs at step %d", self.rank, cfg.epochs, s.step)
            return True
        if self.stop.set or (cfg.stop_after is not None and s.step - s.start_step >= cfg.stop_after):
            s.stopped = True
            return True
        return False

    def _set_schedules(self) -> None:
        """The step's learning rate and key-encoder momentum: by step, or by training seconds under a budget."""
        cfg, s = self.cfg, self.state
        if self.budget_s:
            spent = min(s.trained, self.budget_s)  # the one step a slow start may take past the budget
            s.lr = budget_lr(self.peak_lr, cfg.lr_schedule, s.step, cfg.warmup_steps, spent / self.budget_s)
            self.moco_m = momentum_at(cfg.moco_momentum, spent, self.budget_s, cfg.moco_momentum_schedule)
        else:
            s.lr = LR_SCHEDULES[cfg.lr_schedule](self.peak_lr, s.step, cfg.steps, cfg.warmup_steps)
            self.moco_m = momentum_at(cfg.moco_momentum, s.step, cfg.steps, cfg.moco_momentum_schedule)
        if not self.v3:  # v1/v2 keep m on the model; v3 takes it as an argument of each step, as the reference
            self.model.m = self.moco_m
        for group in self.optimizer.param_groups:
            group["lr"] = s.lr

    def train_step(self, batch: Batch, t_data: float) -> None:
        """One MoCo step on `batch` (fetched at `t_data`). The host does not wait for the device here."""
        cfg, s = self.cfg, self.state
        im_q = batch.q.to(self.device, non_blocking=True)
        im_k = batch.k.to(self.device, non_blocking=True)
        if self.amp.channels_last:
            im_q = im_q.contiguous(memory_format=torch.channels_last)
            im_k = im_k.contiguous(memory_format=torch.channels_last)
        self._set_schedules()
        with self.amp.autocast():
            loss, accuracy = self._loss(im_q, im_k)
        self.optimizer.zero_grad(set_to_none=True)
        self.amp.backward_and_step(loss, self.optimizer, self.guard, self.trainable)  # non-finite: skipped on device
        self.loader.consumed(batch)  # only now: a batch fetched but not trained on is not lost on resume
        self._last = loss, accuracy
        s.step += 1
        if self.trace:
            self.trace.write(trace_lines(batch.keys))
        t_step_end = time.perf_counter()
        self.metrics.record_step(len(batch.keys), t_step_end - s.t_end, t_data - s.t_end)
        if self.tuner:  # fewer compute threads while other processes take CPUs
            self.tuner.step(t_step_end - s.t_end)
            self.metrics.threads.labels(self.metrics.rank, "intra_op").set(self.tuner.threads)
        s.wait_seconds += t_data - s.t_end
        s.samples += len(batch.keys)
        s.t_end = t_step_end
        self.bar.update(1)

    def _loss(self, im_q: torch.Tensor, im_k: torch.Tensor):
        """The step's loss and a function giving its instance accuracy (computed at log steps only)."""
        if self.v3:  # the symmetrised, gathered-keys loss; m as the schedule says
            loss = self.ddp(im_q, im_k, self.moco_m)
            accuracy = self.model.accuracy
            return loss, lambda: accuracy
        logits, labels = self.ddp(im_q, im_k)
        # symmetric: the two directions' losses are summed, as in the reference CIFAR demo
        return info_nce(logits.float(), labels) * (2 if self.cfg.symmetric else 1), lambda: instance_accuracy(logits)

    def _read_loss(self) -> None:
        loss, accuracy = self._last
        self.state.loss = loss.item()  # the host syncs: at log steps only
        self.state.accuracy = accuracy().item()

    # ---- reporting and checkpoints -------------------------------------------------------------------------
    def log(self) -> None:
        """Metrics, loss trace, progress bar and (rank 0) the compact log line of the latest step."""
        cfg, s = self.cfg, self.state
        self._read_loss()
        nonfinite = self.guard.check()  # raises after --max-nonfinite-steps in a row
        s.nonfinite_steps += nonfinite
        grad_norm = self.guard.grad_norm.item()
        now = time.perf_counter()
        ips = (s.step - s.last_log_step) * cfg.batch_size / max(now - s.last_log_time, 1e-9)
        s.last_log_time, s.last_log_step = now, s.step
        epoch, progress = self.loader.epoch_progress
        self.metrics.record_log(step=s.step, loss=s.loss, lr=s.lr, accuracy=s.accuracy, images_per_second=ips,
                                epoch=epoch, epoch_progress=progress, grad_norm=grad_norm, momentum=self.moco_m,
                                nonfinite=nonfinite)
        self.metrics.sync_skipped(self.loader.skipped)
        if self.loss_trace:
            self.loss_trace.write(f"{s.step} {s.loss!r}\n")
        self.bar.set_postfix(loss=f"{s.loss:.3f}", img_s=f"{ips * self.world:.1f}", refresh=False)
        if not self.is_main:
            return
        elapsed = now - s.t_start
        eta = min((self.max_steps - s.step) * elapsed / max(1, s.step - s.start_step),
                  self.budget_s - s.trained if self.budget_s else math.inf)
        log.info("step %d%s | %.1f img/s | data wait %.0f%% | loss %.4f | lr %.4g | acc %.2f | gnorm %.3g%s | ETA %s",
                 s.step, f"/{cfg.steps}" if cfg.steps else "", ips * self.world,
                 100 * s.wait_seconds / max(elapsed, 1e-9), s.loss, s.lr, s.accuracy, grad_norm,
                 f" | non-finite {nonfinite}" if nonfinite else "", format_duration(eta))

    def run_knn(self) -> None:
        t0 = time.perf_counter()
        self.state.knn_top1 = value = self.knn(self.model)
        self.metrics.record_knn(value, time.perf_counter() - t0)
        log.info("step %d: kNN top-1 %.2f%% (%.1f s)", self.state.step, 100 * value, time.perf_counter() - t0)

    def checkpoint(self, reason: str) -> str | None:
        """Every rank's stream position, RNG and trace offsets, gathered; rank 0 writes them with the model and
        optimizer and returns the path (None elsewhere). All ranks leave together."""
        cfg, s = self.cfg, self.state
        trace = (self.trace.tell(), self.loss_trace.tell()) if self.trace else None
        states = gather({"loader": self.loader.position_state(), "rng": rng_state(), "trace": trace}, self.world)
        path = None
        if self.is_main:
            t0 = time.perf_counter()
            path = checkpoint.save(cfg.checkpoint_dir, s.step, {
                "step": s.step, "train_seconds": s.trained, "world": self.world, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "grad_scaler": self.amp.state_dict(),
                "loader": self.loader.checkpoint_state([r["loader"] for r in states]),
                "rng": [r["rng"] for r in states], "trace": [r["trace"] for r in states],
                "config": mask_secrets(dataclasses.asdict(cfg))}, keep=cfg.keep_checkpoints, storage=self.storage)
            self.metrics.checkpoint_seconds.labels(str(self.rank)).observe(time.perf_counter() - t0)
            log.info("checkpoint (%s) at step %d: %s", reason, s.step, path)
        if self.trace:
            self.trace.flush()
            self.loss_trace.flush()
        if self.world > 1:
            dist.barrier()
        return path

    def summary(self) -> dict:
        s, world = self.state, self.world
        elapsed = time.perf_counter() - s.t_start
        return {"step": s.step, "steps_run": s.step - s.start_step, "seconds": elapsed, "train_seconds": s.trained,
                "images_per_second": s.samples * world / max(elapsed, 1e-9),
                "data_wait_share": s.wait_seconds / max(elapsed, 1e-9), "stopped": s.stopped, "loss": s.loss,
                "instance_accuracy": s.accuracy, "checkpoint": s.checkpoint, "metrics_port": self.metrics_port,
                "skipped": dict(self.loader.skipped), "knn_top1": s.knn_top1, "nonfinite_steps": s.nonfinite_steps,
                "rank": self.rank, "world": world, "cpu_budget": self.cpu.cpus,
                "intra_op_threads": self.tuner.threads if self.tuner else self.threads.intra_op,
                "thread_switches": self.tuner.switches if self.tuner else 0}


def train(cfg: TrainConfig) -> dict:
    """Train this rank as `cfg` says; every resource is closed on return. The summary is plain data: to read
    the metrics endpoint after the last step, use `with Trainer(cfg) as trainer: trainer.train()` instead."""
    with Trainer(cfg) as trainer:
        return trainer.train()
