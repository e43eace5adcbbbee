"""Training configuration: one dataclass, filled from, lowest precedence first:

    defaults < recipe presets < config file (YAML/TOML/JSON; --config or MOCOSTREAM_CONFIG)
             < environment variables MOCOSTREAM_<OPTION> < command-line flags

Each option is one field of TrainConfig: its type, default, help text and choices. The flag
(`--batch-size`), the config-file key (`batch_size` or `batch-size`), the environment variable
(MOCOSTREAM_BATCH_SIZE) and the --print-config entry all come from it (ops.options).
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
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mocostream.moco_core.vocabulary import is_vit
from mocostream.pipeline.vocabulary import BACKEND_ALIASES, BACKEND_CHOICES, RECIPES, alias_notice

from .options import choices_of, flag_of, old_names_of, option_fields, plain_type

log = logging.getLogger("mocostream.config")


class ConfigError(ValueError):
    user_error = True


# Paper defaults per recipe (MoCo v1: arXiv 1911.05722; v2: arXiv 2003.04297; v3: arXiv 2104.02057 and the
# recipes of its repository's README). Flags override them.
# v1: T 0.07, linear head, lr x0.1 at 60% and 80% of the run; v2: T 0.2, MLP 2048->128 head, cosine lr.
# Both: base lr 0.03 per 256 images, SGD momentum 0.9, weight decay 1e-4, m 0.999 constant, dim 128.
# v3: projector + predictor (dim 256), no queue, m 0.99 rising to 1 on a cosine, warmup (10% of --steps) then
# cosine lr; by backbone (V3_BY_BACKBONE): ViT AdamW lr 1.5e-4 wd 0.1 T 0.2; ResNet LARS lr 0.6 wd 1e-6 T 1.0.
_V1_V2 = {"dim": 128, "moco_momentum": 0.999, "moco_momentum_schedule": "constant", "optimizer": "sgd",
          "base_lr": 0.03, "weight_decay": 1e-4, "warmup_steps": 0}
RECIPE_DEFAULTS = {  # one entry per recipe in pipeline/vocabulary.py RECIPES
    "moco_v1": {"temperature": 0.07, "mlp": False, "lr_schedule": "step", **_V1_V2},
    "moco_v2": {"temperature": 0.2, "mlp": True, "lr_schedule": "cosine", **_V1_V2},
    "moco_v3": {"dim": 256, "mlp": True, "moco_momentum": 0.99, "moco_momentum_schedule": "cosine",
                "lr_schedule": "cosine"},
}
V3_BY_BACKBONE = {
    "vit": {"optimizer": "adamw", "base_lr": 1.5e-4, "weight_decay": 0.1, "temperature": 0.2},
    "resnet": {"optimizer": "lars", "base_lr": 0.6, "weight_decay": 1e-6, "temperature": 1.0},
}
V3_WARMUP_SHARE = 0.1  # the R-50 recipe's 10 of 100 epochs (ViT: 40 of 300)

# Named presets: defaults for one use, laid under the config file, the environment and the flags (any of which
# overrides them), above the recipe's. They pick among the recipes' algorithms; they never change one.
# small_cpu: MoCo v2's algorithm on small images (CIFAR-sized) on CPU, set for what it learns per CPU-minute at
# short budgets (bench/learn_factors.py and bench/learn_cifar.py --recipes small_cpu, BENCHMARKS.md): the CIFAR
# stem at half width, 24-px crops, batch 128, MLP head, T 0.1, base lr 0.12 with 100 warmup steps and a cosine,
# weight decay 5e-4, m 0.99, K 4,096, Shuffle BN over 8 sub-batches of 16.
PRESETS = {
    # 24-px crops: ~1.8x the images of 32-px ones per CPU-minute, and +3.6 kNN points at 10 minutes on one core
    "small_cpu": {"recipe": "moco_v2", "arch": "resnet18_cifar_half", "image_size": 24, "batch_size": 128,
                  "mlp": True, "temperature": 0.1, "base_lr": 0.12, "warmup_steps": 100, "lr_schedule": "cosine",
                  "weight_decay": 5e-4, "moco_momentum": 0.99, "queue_size": 4096, "bn_splits": 8},
}


def recipe_defaults(recipe: str, arch: str) -> dict:
    """The presets of `recipe` for this backbone."""
    if recipe != "moco_v3":
        return RECIPE_DEFAULTS[recipe]
    return {**RECIPE_DEFAULTS[recipe], **V3_BY_BACKBONE["vit" if is_vit(arch) else "resnet"]}


ENV_PREFIX = "MOCOSTREAM_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"  # names the config file; not an option


def opt(default, help: str, **meta):
    """A TrainConfig option: its default and help, plus ops.options metadata (choices, metavar)."""
    return field(default=default, metadata={"help": help, **meta})


# Choices come from the registries that use them, looked up when needed; none of these imports torch.
def _archs():
    from mocostream.moco_core import ARCHS
    return ARCHS


def _lr_schedules():
    from mocostream.moco_core import LR_SCHEDULES
    return tuple(LR_SCHEDULES)


def _momentum_schedules():
    from mocostream.moco_core import MOMENTUM_SCHEDULES
    return MOMENTUM_SCHEDULES


def _optimizers():
    from mocostream.moco_core import OPTIMIZERS
    return OPTIMIZERS


def _preflight_modes():
    from mocostream.pipeline.vocabulary import PREFLIGHT
    return PREFLIGHT


def _precisions():
    from .precision import PRECISIONS
    return PRECISIONS


@dataclass
class TrainConfig:
    data: str = opt("", "training shards: manifest.json, a folder or s3:// prefix holding one, a brace pattern "
                        "(s3://b/shard-{000000..000099}.tar) or a comma-separated list of shard URLs")
    steps: int | None = opt(None, "optimizer steps to run (the lr schedule spans them); default 1000, or no cap "
                                  "with --budget-minutes")
    budget_minutes: float | None = opt(None, "train for this many minutes of wall clock, summed over resumes; the "
                                             "lr and momentum schedules then span the budget, not --steps (which "
                                             "only caps the run)")
    batch_size: int = opt(32, "samples per rank per step (global batch = this x ranks)")
    arch: str = opt("resnet18", "encoder; the _cifar ones have a 3x3 stem for small images; the vit_ ones are MoCo "
                                "v3's ViTs (vit_tiny: 4-px patches, for 32-px images)", choices=_archs)
    image_size: int = opt(224, "side of the square crops fed to the encoder")
    backend: str = opt("auto", "augmentation backend: dali (DALI's graph, on the GPU when training on one), "
                               "opencv (OpenCV worker processes: the faster one on CPU), or auto: dali when "
                               "training on a CUDA GPU, else opencv (torch: the old name of opencv)",
                       choices=BACKEND_CHOICES)
    preset: str | None = opt(None, "a named set of defaults under the other options: small_cpu (MoCo v2 on small "
                                   "images on CPU, set for learning per CPU-minute: half-width CIFAR ResNet-18, "
                                   "24-px crops, batch 128, T 0.1, lr 0.12, K 4096, m 0.99, 8 BN splits)",
                             choices=lambda: tuple(PRESETS))
    recipe: str = opt("moco_v2", "moco_v1 (T 0.07, linear head), moco_v2 (T 0.2, MLP head, aug+ with blur) or "
                                 "moco_v3 (no queue, projector + predictor, symmetric loss; AdamW for ViTs, LARS for "
                                 "ResNets; BYOL's asymmetric augmentation)", choices=RECIPES)
    queue_size: int = opt(65536, "K, the number of negatives kept in the queue (any value; no multiple-of-batch "
                                 "rule)")
    dim: int | None = opt(None, "feature dimension of the keys/queries (default: the recipe's, 128; v3 256)")
    mlp_dim: int = opt(4096, "moco_v3: hidden width of the projector and predictor MLPs")
    stop_grad_conv1: bool = opt(True, "ViTs: keep the patch projection at its random initialisation (MoCo v3's "
                                      "fix for unstable training)")
    moco_momentum: float | None = opt(None, "m, the key encoder's momentum (default: the recipe's, 0.999; v3 0.99)")
    temperature: float | None = opt(None, "T of the InfoNCE loss (default: the recipe's)")
    mlp: bool | None = opt(None, "MLP projection head (default: the recipe's)")
    bn_splits: int = opt(0, "single-device shuffle BN sub-batches (0: auto, 2..8 on one rank, 1 under DDP)")
    optimizer: str | None = opt(None, "sgd (v1/v2), lars (v3 ResNets) or adamw (v3 ViTs); default: the recipe's",
                                choices=_optimizers)
    base_lr: float | None = opt(None, "learning rate for a global batch of 256 (scaled linearly); default: the "
                                      "recipe's (0.03; v3 ViT 1.5e-4, ResNet 0.6)")
    weight_decay: float | None = opt(None, "weight decay (default: the recipe's, 1e-4; v3 ViT 0.1, ResNet 1e-6)")
    sgd_momentum: float = opt(0.9, "SGD and LARS momentum")
    warmup_steps: int | None = opt(None, "linear warmup steps from 0 to the peak lr (default: 0; v3 10%% of --steps, "
                                         "0 under --budget-minutes without --steps)")
    lr_schedule: str | None = opt(None, "cosine, or step (x0.1 at 60%% and 80%% of the run); default: the "
                                        "recipe's", choices=_lr_schedules)
    moco_momentum_schedule: str | None = opt(None, "constant m, or cosine: m rises from --moco-momentum to 1 over "
                                                   "the run (default: the recipe's; v3 cosine)",
                                             choices=_momentum_schedules, old_names=("momentum_schedule",))
    symmetric: bool = opt(False, "v1/v2 symmetric loss: each view is also the query of the other (2N keys "
                                 "enqueued); v3's loss is always symmetric")
    sync_bn: bool = opt(False, "SyncBatchNorm in the query encoder (GPU, several ranks)")
    compile: bool = opt(False, "torch.compile the encoders")
    precision: str = opt("auto", "auto (on CUDA bf16 autocast, or fp16 with a gradient scaler on GPUs without "
                                 "bf16; fp32 on CPU), fp32, bf16 (also on CPUs with AMX/AVX512-BF16, about 2x "
                                 "faster there), or fp16", choices=_precisions)
    init_from: str | None = opt(None, "start both encoders from these backbone weights (a torchvision/timm ResNet "
                                      "or a timm ViT state_dict, safetensors, or a file `mocostream export` wrote; "
                                      "local or s3://); head and queue fresh")
    clip_grad: float = opt(0.0, "clip the gradients' global L2 norm to this before each optimizer step (0: off, as "
                                "the MoCo references train); mocostream_grad_norm still reports the norm before "
                                "clipping", metavar="NORM")
    max_nonfinite_steps: int = opt(10, "stop with an error after this many non-finite steps in a row (0: never)")
    knn_data: str | None = opt(None, "labelled eval set for the kNN monitor: train/ + test/ (or val/) class "
                                     "folders, one class-folder tree (every 5th image a query), or labelled shards")
    knn_every: int = opt(0, "steps between kNN evaluations (0: only at the end, when --knn-data is given)")
    knn_k: int = opt(200, "neighbours of the weighted kNN")
    knn_t: float = opt(0.1, "temperature of the kNN vote weights")
    knn_max_per_class: int | None = opt(None, "use at most this many images per class and split (bounds eval "
                                              "time)")
    knn_image_size: int | None = opt(None, "side the kNN images are resized to (default: --image-size; training "
                                           "on small random crops, the images' own size measures better)")
    seed: int = opt(0, "seed of the data order, augmentation and weights")
    workers: int | None = opt(None, "opencv backend: augmentation processes; dali: CPU threads (and image-check "
                                    "threads); default: from the CPU budget")
    cpus: float | None = opt(None, "CPUs this job may use on the node (default: the smallest of the affinity mask "
                                   "and the cgroup CPU quota); split among the node's ranks, then among the thread "
                                   "pools")
    intra_op_threads: int | None = opt(None, "torch compute threads per rank (default: from the CPU budget)")
    adapt_threads: bool = opt(True, "on CPU, measure and use fewer compute threads while other processes take "
                                    "CPUs (ops/thread_tuner.py)")
    preflight_check: str = opt("auto", "dali: check every image before it reaches DALI: auto (skipped for shards "
                                       "that `shards create` validated), always or never", choices=_preflight_modes)
    shuffle_shards: int = opt(4, "shards mixed together by the in-memory shuffle")
    read_ahead: int = opt(2, "shard blocks fetched ahead of use")
    read_ahead_mb: int = opt(1024, "most MB of shards being fetched ahead at once")
    storage_retries: int = opt(5, "retries of a failed shard read (exponential backoff with jitter)")
    storage_timeout: float = opt(60.0, "seconds a storage read may stall before it is retried")
    allow_external_shards: bool = opt(False, "let a manifest name shards outside its own folder (../, absolute "
                                             "paths, URLs)")
    epochs: int | None = opt(None, "stop after this many passes over the data (default: endless; --steps or "
                                   "--budget-minutes ends the run)")
    device: str = opt("auto", "where to train (auto: cuda when there is a GPU)", choices=("auto", "cpu", "cuda"))
    metrics_port: int = opt(9400, "Prometheus endpoint port (rank r uses port + local rank); 0 disables")
    metrics_addr: str = opt("0.0.0.0", "address the metrics endpoint binds to (default 0.0.0.0: every interface, "
                                       "no authentication, as a pod's scrape target needs; 127.0.0.1 keeps it on "
                                       "this host)")
    checkpoint_dir: str = opt("checkpoints", "folder or s3:// prefix for checkpoints")
    checkpoint_every: int = opt(500, "steps between checkpoints")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep")
    resume: bool = opt(False, "continue from the latest checkpoint")
    trace_keys: str | None = opt(None, "write the keys each rank consumed, in order, to PATH.rank<r> (and the "
                                       "loss of every logged step to PATH.rank<r>.loss)")
    stop_after: int | None = opt(None, "behave as if preempted after this many steps of this run: checkpoint, "
                                       "exit 0 (resume tests)")
    log_every: int = opt(10, "steps between log lines / metric updates (each costs a host sync)")
    progress: bool = opt(True, "a progress bar when rank 0 writes to a terminal")

    def resolved(self) -> "TrainConfig":
        """A copy with recipe defaults filled in, after checking every value."""
        cfg = dataclasses.replace(self)
        if alias_notice(cfg.backend):  # an old name (a config file from before) still works
            log.warning(alias_notice(cfg.backend))
            cfg.backend = BACKEND_ALIASES[cfg.backend]
        check_choices(cfg)  # the recipe first: its presets fill what is unset
        for key, value in recipe_defaults(cfg.recipe, cfg.arch).items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if cfg.steps is None and cfg.budget_minutes is None:
            cfg.steps = 1000
        if cfg.warmup_steps is None:  # v3: a share of a run planned in steps
            cfg.warmup_steps = round(V3_WARMUP_SHARE * cfg.steps) if cfg.steps and not cfg.budget_minutes else 0
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("no training data: give --data (a manifest, shard folder, brace pattern or URL list)")
        checks = [
            (self.steps is None or self.steps >= 1, "--steps must be >= 1"),
            (self.budget_minutes is None or self.budget_minutes > 0, "--budget-minutes must be > 0"),
            (self.batch_size >= 2, "--batch-size must be >= 2"),
            (self.image_size >= 8, "--image-size must be >= 8"),
            (self.queue_size >= 1, "--queue-size must be >= 1"),
            (self.dim >= 1, "--dim must be >= 1"),
            (self.mlp_dim >= 1, "--mlp-dim must be >= 1"),
            (self.recipe == "moco_v3" or not is_vit(self.arch),
             f"--arch {self.arch} trains with --recipe moco_v3 (a ViT has no `fc` for the v1/v2 heads)"),
            (self.bn_splits >= 0 and (self.bn_splits == 0 or self.batch_size % self.bn_splits == 0),
             f"--bn-splits must divide --batch-size {self.batch_size} (or be 0 for auto)"),
            (0.0 <= self.moco_momentum <= 1.0, "--moco-momentum must be in [0, 1]"),
            (self.temperature is None or self.temperature > 0, "--temperature must be > 0"),
            (0 <= self.metrics_port < 65536, "--metrics-port must be in 0..65535"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be >= 1"),
            (self.workers is None or self.workers >= 0, "--workers must be >= 0"),
            (self.cpus is None or 0 < self.cpus < math.inf, "--cpus must be a positive number of CPUs"),
            (self.intra_op_threads is None or self.intra_op_threads >= 1, "--intra-op-threads must be >= 1"),
            (self.log_every >= 1, "--log-every must be >= 1"),
            (self.read_ahead >= 1 and self.read_ahead_mb >= 1, "--read-ahead and --read-ahead-mb must be >= 1"),
            (self.storage_retries >= 0 and self.storage_timeout > 0, "--storage-retries >= 0, --storage-timeout > 0"),
            (self.epochs is None or self.epochs >= 1, "--epochs must be >= 1"),
            (0 <= self.warmup_steps <= (self.steps or self.warmup_steps), "--warmup-steps must be in [0, --steps]"),
            (self.max_nonfinite_steps >= 0, "--max-nonfinite-steps must be >= 0"),
            (0 <= self.clip_grad < math.inf, "--clip-grad must be a norm >= 0 (0: no clipping)"),
            (self.knn_image_size is None or self.knn_image_size >= 8, "--knn-image-size must be >= 8"),
            (self.knn_every >= 0 and self.knn_k >= 1 and self.knn_t > 0,
             "--knn-every >= 0, --knn-k >= 1 and --knn-t > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def check_choices(cfg: TrainConfig) -> None:
    """Each option with choices holds one of them (from any source: file, environment, flag)."""
    for f in option_fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.metadata.get("choices") is not None and value is not None and value not in choices_of(f):
            raise ConfigError(f"unknown {flag_of(f)} {value!r}; choose from {', '.join(choices_of(f))}")


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


TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
OPTIONS = tuple(f.name for f in option_fields(TrainConfig))
FLAGS = {f.name: flag_of(f) for f in option_fields(TrainConfig)}
OLD_NAMES = {old: f.name for f in option_fields(TrainConfig) for old in old_names_of(f)}  # old -> current
OPTIONAL = {name for name in OPTIONS if type(None) in typing.get_args(typing.get_type_hints(TrainConfig)[name])}


def _typed(name: str, value, where: str):
    """`value` as the option's type: strings are parsed (environment, quoted config values); other values
    must already be of that type (YAML/TOML/JSON numbers and booleans). Anything else: ConfigError naming
    the option, so `"resume": "no"` never turns resuming on."""
    typ = plain_type(TrainConfig, name)
    if value is None and name in OPTIONAL:
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
    values = {}
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV:
            continue
        name = var[len(ENV_PREFIX):].lower()
        if name not in OPTIONS and name not in OLD_NAMES:
            raise ConfigError(f"unknown option in environment variable {var}")
        values[name] = _typed(OLD_NAMES.get(name, name), raw, var)
    return current_names(values, "in the environment", env_var)


def renamed_notice(old: str, new: str) -> str:
    return f"{old} is the old name of {new} (the same option; the old name still works)"


def current_names(values: dict, where: str, spell=lambda name: name) -> dict:
    """`values` with each option under an old name moved to its current name (with a notice). `spell` writes a
    name as the source does (a flag for the command line)."""
    values = dict(values)
    for old in sorted(set(values) & set(OLD_NAMES)):
        new, value = OLD_NAMES[old], values.pop(old)
        if values.get(new) is not None and values[new] != value:
            raise ConfigError(f"{spell(old)} and {spell(new)} {where} name the same option: give one")
        log.warning(renamed_notice(f"{spell(old)} {where}", spell(new)))
        values[new] = value
    return values


def env_var(name: str) -> str:
    return ENV_PREFIX + name.upper()


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
    options = {name: getattr(cfg, name) for name in OPTIONS}
    return mask_secrets({"options": options, "environment": storage_env})


def build_config(file_values: dict, overrides: dict, environ: typing.Mapping[str, str] | None = None) -> TrainConfig:
    """Defaults < recipe < preset < file < MOCOSTREAM_* environment < flags (flags given as None are 'not set'). Values are
    parsed and checked alike from every source: text (the environment, flags) or typed (files, callers)."""
    file_values = current_names(file_values, "in the config file")
    overrides = current_names({k: v for k, v in overrides.items() if v is not None}, "on the command line",
                              lambda name: "--" + name.replace("_", "-"))
    for where, names in (("config file", file_values), ("flags", overrides)):
        unknown = sorted(set(names) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"unknown option in {where}: {unknown[0]}")
    file_values = {k: _typed(k, v, f"{k} in the config file") for k, v in file_values.items()}
    flags = {k: _typed(k, v, FLAGS[k]) for k, v in overrides.items() if v is not None}
    values = {**file_values, **env_values(environ), **flags}
    if values.get("preset") is not None:
        if values["preset"] not in PRESETS:
            raise ConfigError(f"unknown --preset {values['preset']!r}; choose from {', '.join(PRESETS)}")
        values = {**PRESETS[values["preset"]], **values}  # the preset under every source that was given
    try:
        return TrainConfig(**values).resolved()
    except TypeError as e:
        raise ConfigError(str(e)) from None
