"""Training configuration: one dataclass, filled from, lowest precedence first:

    defaults < recipe presets < config file (YAML/TOML/JSON; --config or MOCOSTREAM_CONFIG)
             < environment variables MOCOSTREAM_<OPTION> < command-line flags

Recipe presets only fill what nothing else set, so every preset value can be overridden.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml


class ConfigError(ValueError):
    user_error = True


# Paper defaults per recipe (MoCo v1: arXiv 1911.05722; v2: arXiv 2003.04297). Flags override them.
# v1: T 0.07, linear head, lr x0.1 at 60% and 80% of the run; v2: T 0.2, MLP 2048->128 head, cosine lr.
# Both: base lr 0.03 per 256 images, SGD momentum 0.9, weight decay 1e-4, m 0.999 (the dataclass defaults).
RECIPE_DEFAULTS = {
    "moco_v1": {"temperature": 0.07, "mlp": False, "lr_schedule": "step"},
    "moco_v2": {"temperature": 0.2, "mlp": True, "lr_schedule": "cosine"},
}
ENV_PREFIX = "MOCOSTREAM_"


@dataclass
class TrainConfig:
    data: str = ""
    steps: int | None = None  # None: 1000, or no cap when budget_minutes is set
    budget_minutes: float | None = None  # wall clock to train for, over all resumes; the schedules follow it
    batch_size: int = 32  # per rank
    arch: str = "resnet18"
    image_size: int = 224
    backend: str = "dali"
    recipe: str = "moco_v2"
    queue_size: int = 65536
    dim: int = 128
    moco_momentum: float = 0.999
    temperature: float | None = None  # None: the recipe's
    mlp: bool | None = None  # None: the recipe's
    bn_splits: int = 0  # single-device shuffle BN sub-batches; 0: auto (2..8 on one rank, 1 under DDP)
    base_lr: float = 0.03  # lr = base_lr * global batch / 256
    weight_decay: float = 1e-4
    sgd_momentum: float = 0.9
    warmup_steps: int = 0
    lr_schedule: str | None = None  # cosine | step; None: the recipe's
    momentum_schedule: str = "constant"  # constant m, or cosine from m to 1 over the run
    symmetric: bool = False  # both views as query: loss(q1, k2) + loss(q2, k1), 2N keys enqueued
    sync_bn: bool = False  # GPU DDP only: SyncBatchNorm in the query encoder
    compile: bool = False  # torch.compile the encoders
    precision: str = "auto"  # auto: bf16 on CUDA (fp16 + grad scaler without bf16), fp32 on CPU | fp32 | bf16 | fp16
    init_from: str | None = None  # a ResNet state_dict / safetensors / exported backbone both encoders start from
    max_nonfinite_steps: int = 10  # stop after this many skipped (non-finite) steps in a row; 0: never
    knn_data: str | None = None  # labelled eval set for the kNN monitor (class folders or labelled shards)
    knn_every: int = 0  # steps between kNN evaluations (0: only at the end, when --knn-data is given)
    knn_k: int = 200
    knn_t: float = 0.1
    knn_max_per_class: int | None = None  # cap on images per class and split, to bound CPU time
    knn_image_size: int | None = None  # side the labelled images are resized to; None: image_size
    seed: int = 0
    workers: int | None = None  # torch: augmentation processes; dali: CPU threads; None: from the CPU budget
    cpus: float | None = None  # CPUs this process may use (None: affinity and cgroup quota decide)
    intra_op_threads: int | None = None  # torch compute threads; None: from the CPU budget
    adapt_threads: bool = True  # on CPU, fewer compute threads while a neighbour takes CPUs (ops/thread_tuner.py)
    preflight_check: str = "auto"  # dali: check images before DALI? auto: not for shards `shards create` validated
    shuffle_shards: int = 4
    read_ahead: int = 2  # shard blocks fetched ahead of use
    read_ahead_mb: int = 1024  # ... and at most this many MB of them in flight
    storage_retries: int = 5
    storage_timeout: float = 60.0  # seconds for a storage read to make progress
    allow_external_shards: bool = False  # manifest names outside the manifest's folder (.., /abs, URLs)
    epochs: int | None = None  # None: endless stream; the run ends after --steps / --budget-minutes either way
    device: str = "auto"  # auto | cpu | cuda
    metrics_port: int = 9400  # 0 disables; rank r serves on port + local rank
    metrics_addr: str = "0.0.0.0"
    checkpoint_dir: str = "checkpoints"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    trace_keys: str | None = None  # also writes the loss of every logged step to PATH.rank<r>.loss
    stop_after: int | None = None  # act as if preempted after this many steps of this run (resume tests)
    log_every: int = 10
    progress: bool = True
    extra: dict = field(default_factory=dict, repr=False)

    def resolved(self) -> "TrainConfig":
        """A copy with recipe defaults filled in, after checking every value."""
        cfg = dataclasses.replace(self)
        if cfg.recipe not in RECIPE_DEFAULTS:
            raise ConfigError(f"unknown recipe {cfg.recipe!r}; choose from {', '.join(RECIPE_DEFAULTS)}")
        for key, value in RECIPE_DEFAULTS[cfg.recipe].items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if cfg.steps is None and cfg.budget_minutes is None:
            cfg.steps = 1000
        cfg.validate()
        return cfg

    def validate(self) -> None:
        from moco_core import ARCHS

        from pipeline.loader import BACKENDS

        if not self.data:
            raise ConfigError("no training data: give --data (a manifest, shard folder, brace pattern or URL list)")
        checks = [
            (self.steps is None or self.steps >= 1, "--steps must be >= 1"),
            (self.budget_minutes is None or self.budget_minutes > 0, "--budget-minutes must be > 0"),
            (self.batch_size >= 2, "--batch-size must be >= 2"),
            (self.image_size >= 8, "--image-size must be >= 8"),
            (self.queue_size >= 1, "--queue-size must be >= 1"),
            (self.dim >= 1, "--dim must be >= 1"),
            (self.bn_splits >= 0 and (self.bn_splits == 0 or self.batch_size % self.bn_splits == 0),
             f"--bn-splits must divide --batch-size {self.batch_size} (or be 0 for auto)"),
            (0.0 <= self.moco_momentum <= 1.0, "--moco-momentum must be in [0, 1]"),
            (self.temperature is None or self.temperature > 0, "--temperature must be > 0"),
            (self.arch in ARCHS, f"unknown --arch {self.arch!r}; choose from {', '.join(ARCHS)}"),
            (self.backend in BACKENDS, f"unknown --backend {self.backend!r}; choose from {', '.join(BACKENDS)}"),
            (self.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
            (0 <= self.metrics_port < 65536, "--metrics-port must be in 0..65535"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be >= 1"),
            (self.workers is None or self.workers >= 0, "--workers must be >= 0"),
            (self.cpus is None or 0 < self.cpus < math.inf, "--cpus must be a positive number of CPUs"),
            (self.intra_op_threads is None or self.intra_op_threads >= 1, "--intra-op-threads must be >= 1"),
            (self.log_every >= 1, "--log-every must be >= 1"),
            (self.read_ahead >= 1 and self.read_ahead_mb >= 1, "--read-ahead and --read-ahead-mb must be >= 1"),
            (self.storage_retries >= 0 and self.storage_timeout > 0, "--storage-retries >= 0, --storage-timeout > 0"),
            (self.epochs is None or self.epochs >= 1, "--epochs must be >= 1"),
            (self.lr_schedule in (None, "cosine", "step"), "--lr-schedule must be cosine or step"),
            (self.momentum_schedule in ("constant", "cosine"), "--momentum-schedule must be constant or cosine"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"), "--precision must be auto, fp32, bf16 or fp16"),
            (0 <= self.warmup_steps <= (self.steps or self.warmup_steps), "--warmup-steps must be in [0, --steps]"),
            (self.max_nonfinite_steps >= 0, "--max-nonfinite-steps must be >= 0"),
            (self.knn_image_size is None or self.knn_image_size >= 8, "--knn-image-size must be >= 8"),
            (self.knn_every >= 0 and self.knn_k >= 1 and self.knn_t > 0,
             "--knn-every >= 0, --knn-k >= 1 and --knn-t > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(p.read_text())
        elif p.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(p.read_text()) or {}
        elif p.suffix == ".json":
            data = json.loads(p.read_text())
        else:
            raise ConfigError(f"config file must be .yaml, .yml, .toml or .json: {path}")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file must hold a mapping of options: {path}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _option_type(name: str) -> type:
    """The plain type of a TrainConfig field (`int | None` -> int)."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _optional(name: str) -> bool:
    return type(None) in typing.get_args(typing.get_type_hints(TrainConfig)[name])


def _parse_env(name: str, raw: str):
    return _typed(name, raw, ENV_PREFIX + name.upper())


def _typed(name: str, value, where: str):
    """`value` as the option's type: strings are parsed (environment, quoted config values); other values
    must already be of that type (YAML/TOML/JSON numbers and booleans). Anything else: ConfigError naming
    the option, so `"resume": "no"` never turns resuming on."""
    typ = _option_type(name)
    if value is None and _optional(name):
        return None
    if isinstance(value, str) and typ is not str:
        text = value.strip().lower()
        if typ is bool and text in TRUE_WORDS + FALSE_WORDS:
            return text in TRUE_WORDS
        if typ in (int, float):
            try:
                return typ(text)
            except ValueError:
                pass
    elif typ is bool and isinstance(value, bool):
        return value
    elif typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif typ is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where} must be {TYPE_WORDS.get(typ, typ.__name__)}, got {value!r}")


def env_values(environ: typing.Mapping[str, str] | None = None) -> dict:
    """Options from MOCOSTREAM_<OPTION> variables (MOCOSTREAM_CONFIG names the config file instead)."""
    environ = os.environ if environ is None else environ
    known = {f.name for f in fields(TrainConfig)} - {"extra"}
    values = {}
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX + "CONFIG":
            continue
        name = var[len(ENV_PREFIX):].lower()
        if name not in known:
            raise ConfigError(f"unknown option in environment variable {var}")
        values[name] = _parse_env(name, raw)
    return values


SECRET_NAME = re.compile(r"secret|password|token|credential|(^|_)key$", re.IGNORECASE)
URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@]*):(?P<password>[^@/]*)@", re.IGNORECASE)


# Query parameters of presigned / SAS URLs that grant access (X-Amz-Signature, X-Amz-Security-Token, sig, ...).
SECRET_QUERY = re.compile(r"(?P<name>[?&][^=&\s]*(?:signature|sig|token|secret|credential|password|key)[^=&\s]*=)"
                          r"[^&\s#'\"]*", re.IGNORECASE)


# user:password@host without its scheme, as storage clients quote a URL's "bucket" in their errors
BARE_USERINFO = re.compile(r"(?P<pre>[\s\"'(]|^)(?P<user>[^\s:/@\"']+):[^\s@/\"']+@(?=[\w.-])")


def mask_text(text: str) -> str:
    """`text` with passwords in URLs and presigned-URL signatures replaced by ***."""
    text = URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    text = BARE_USERINFO.sub(lambda m: f"{m['pre']}{m['user']}:***@", text)
    return SECRET_QUERY.sub(lambda m: f"{m['name']}***", text)


def mask_secrets(value, name: str = ""):
    """A copy of `value` safe to print: passwords in URLs, URL signatures and values of secret-looking
    names become ***."""
    if isinstance(value, dict):
        return {k: mask_secrets(v, k) for k, v in value.items()}
    if isinstance(value, str):
        if name and SECRET_NAME.search(name) and value:
            return "***"
        return mask_text(value)
    return value


class MaskingFormatter(logging.Formatter):
    """Log lines (shard URLs in warnings and errors) never carry a password or a URL signature."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_text(super().format(record))


def mask_logs() -> None:
    """Give every handler of the root logger the masking formatter (keeping its format)."""
    for handler in logging.getLogger().handlers:
        fmt = handler.formatter
        handler.setFormatter(MaskingFormatter(fmt._fmt if fmt else None, fmt.datefmt if fmt else None))


def printable_config(cfg: TrainConfig, environ: typing.Mapping[str, str] | None = None) -> dict:
    """The resolved configuration and the storage environment it will use, secrets masked."""
    environ = os.environ if environ is None else environ
    storage_env = {k: v for k, v in sorted(environ.items())
                   if k.startswith("AWS_") or k.startswith(ENV_PREFIX)}
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "extra"}
    return mask_secrets({"options": options, "environment": storage_env})


def build_config(file_values: dict, overrides: dict, environ: typing.Mapping[str, str] | None = None) -> TrainConfig:
    """Defaults < file < MOCOSTREAM_* environment < flags (flags given as None are 'not set')."""
    known = {f.name for f in fields(TrainConfig)} - {"extra"}
    unknown = sorted(set(file_values) - known)
    if unknown:
        raise ConfigError(f"unknown option in config file: {unknown[0]}")
    file_values = {k: _typed(k, v, f"{k} in the config file") for k, v in file_values.items()}
    values = {**file_values, **env_values(environ),
              **{k: v for k, v in overrides.items() if v is not None and k in known}}
    try:
        return TrainConfig(**values).resolved()
    except TypeError as e:
        raise ConfigError(str(e)) from None
