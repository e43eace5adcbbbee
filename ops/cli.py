"""The `mocostream` command: demo, train, eval, shards."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .config import build_config, mask_logs, mask_text, printable_config, read_config_file

TRAIN_FLAGS = [
    # (flag, type, help)
    ("--data", str, "training shards: manifest.json, a folder or s3:// prefix holding one, a brace pattern "
                    "(s3://b/shard-{000000..000099}.tar) or a comma-separated list of shard URLs"),
    ("--steps", int, "optimizer steps to run (the lr schedule spans them); default 1000, or no cap with "
                     "--budget-minutes"),
    ("--budget-minutes", float, "train for this many minutes of wall clock, summed over resumes; the lr and "
                                "momentum schedules then span the budget, not --steps (which only caps the run)"),
    ("--batch-size", int, "samples per rank per step (global batch = this x ranks)"),
    ("--arch", str, "encoder: resnet18, resnet50, resnet18_cifar, resnet50_cifar (3x3 stem for small images)"),
    ("--image-size", int, "side of the square crops fed to the encoder"),
    ("--backend", str, "augmentation backend: dali (GPU when present, else CPU) or torch (PIL/torchvision)"),
    ("--recipe", str, "moco_v1 (T 0.07, linear head) or moco_v2 (T 0.2, MLP head, aug+ with blur)"),
    ("--queue-size", int, "K, the number of negatives kept in the queue (any value; no multiple-of-batch rule)"),
    ("--dim", int, "feature dimension of the keys/queries"),
    ("--moco-momentum", float, "m, the key encoder's momentum"),
    ("--temperature", float, "T of the InfoNCE loss (default: the recipe's)"),
    ("--bn-splits", int, "single-rank shuffle BN sub-batches (0 = auto)"),
    ("--base-lr", float, "learning rate for a global batch of 256 (scaled linearly)"),
    ("--weight-decay", float, "SGD weight decay"),
    ("--warmup-steps", int, "linear warmup steps from 0 to the peak lr"),
    ("--lr-schedule", str, "cosine or step (x0.1 at 60%% and 80%% of the run); default: the recipe's"),
    ("--momentum-schedule", str, "constant m, or cosine: m rises to 1 over the run"),
    ("--precision", str, "auto (on CUDA bf16 autocast, or fp16 with a gradient scaler on GPUs without bf16; "
                         "fp32 on CPU), fp32, bf16 (also on CPUs with AMX/AVX512-BF16, about 2x faster there), "
                         "or fp16"),
    ("--init-from", str, "start both encoders from these backbone weights (a torchvision/timm ResNet state_dict, "
                         "safetensors, or a file `mocostream export` wrote; local or s3://); head and queue fresh"),
    ("--max-nonfinite-steps", int, "stop with an error after this many non-finite steps in a row (0: never)"),
    ("--knn-data", str, "labelled eval set for the kNN monitor: train/ + test/ (or val/) class folders, "
                        "one class-folder tree (every 5th image a query), or labelled shards"),
    ("--knn-every", int, "steps between kNN evaluations (0: only at the end)"),
    ("--knn-k", int, "neighbours of the weighted kNN"),
    ("--knn-image-size", int, "side the kNN images are resized to (default: --image-size; training on small "
                              "random crops, the images' own size measures better)"),
    ("--knn-t", float, "temperature of the kNN vote weights"),
    ("--knn-max-per-class", int, "use at most this many images per class and split (bounds eval time)"),
    ("--seed", int, "seed of the data order, augmentation and weights"),
    ("--workers", int, "torch backend: augmentation processes; dali: CPU threads"),
    ("--preflight-check", str, "dali: check every image before it reaches DALI: auto (skipped for shards that "
                               "`shards create` validated), always or never"),
    ("--shuffle-shards", int, "shards mixed together by the in-memory shuffle"),
    ("--read-ahead", int, "shard blocks fetched ahead of use"),
    ("--read-ahead-mb", int, "most MB of shards being fetched ahead at once"),
    ("--storage-retries", int, "retries of a failed shard read (exponential backoff with jitter)"),
    ("--storage-timeout", float, "seconds a storage read may stall before it is retried"),
    ("--epochs", int, "stop after this many passes over the data (default: endless; --steps or "
                      "--budget-minutes ends the run)"),
    ("--device", str, "auto, cpu or cuda"),
    ("--metrics-port", int, "Prometheus endpoint port (rank r uses port + local rank); 0 disables"),
    ("--metrics-addr", str, "address the metrics endpoint binds to (default 0.0.0.0: every interface, no "
                            "authentication, as a pod's scrape target needs; 127.0.0.1 keeps it on this host)"),
    ("--checkpoint-dir", str, "folder or s3:// prefix for checkpoints"),
    ("--checkpoint-every", int, "steps between checkpoints"),
    ("--keep-checkpoints", int, "how many recent checkpoints to keep"),
    ("--trace-keys", str, "write the keys each rank consumed, in order, to PATH.rank<r>"),
    ("--stop-after", int, "behave as if preempted after this many steps of this run: checkpoint, exit 0"),
    ("--log-every", int, "steps between log lines / metric updates (each costs a host sync)"),
]


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="run MoCo pretraining (single process or under torchrun)",
                       description="Run MoCo pretraining on a stream of shards. Each option comes from, in "
                                   "rising precedence: its default, the recipe, --config FILE (YAML/TOML/JSON, keys "
                                   "as the long flags; or MOCOSTREAM_CONFIG), an environment variable "
                                   "MOCOSTREAM_<OPTION> (e.g. MOCOSTREAM_BATCH_SIZE=64), the flag.")
    p.add_argument("--config", help="YAML, TOML or JSON file of options (default: $MOCOSTREAM_CONFIG)")
    for flag, typ, help_text in TRAIN_FLAGS:
        p.add_argument(flag, type=typ, default=None, help=help_text)
    p.add_argument("--resume", action="store_true", default=None, help="continue from the latest checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=None, help="MLP projection head")
    p.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric loss: each view is also the query of the other")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="SyncBatchNorm in the query encoder (GPU, several ranks)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the encoders")
    p.add_argument("--allow-external-shards", action=argparse.BooleanOptionalAction, default=None,
                   help="let a manifest name shards outside its own folder (../, absolute paths, URLs)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration (secrets masked) and exit")
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    from .train import train

    config_file = args.config or os.environ.get("MOCOSTREAM_CONFIG")
    file_values = read_config_file(config_file) if config_file else {}
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("config", "func", "command", "print_config", "verbose")}
    cfg = build_config(file_values, overrides)
    if args.print_config:
        print(json.dumps(printable_config(cfg), indent=2))
        return 0
    summary = train(cfg)
    if summary["rank"] == 0:
        print(json.dumps(summary))
    return 0


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="build shards from generated images and train a few MoCo steps on them",
                       description="The whole pipeline on an embedded default: shards -> DALI two views -> MoCo "
                                   "-> Prometheus metrics. Needs no input; about a minute on 2 CPU cores.")
    p.add_argument("--workdir", default="demo-output", help="where shards, checkpoints and traces go")
    p.add_argument("--steps", type=int, default=40, help="training steps")
    p.add_argument("--backend", default="dali", choices=["dali", "torch"], help="augmentation backend")
    p.add_argument("--metrics-port", type=int, default=9400, help="Prometheus endpoint port (0 = any free port)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from .demo import demo

    demo(args.workdir, steps=args.steps, backend=args.backend, metrics_port=args.metrics_port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mocostream",
        description="Streaming MoCo pretraining: shards on object storage -> DALI two-view augmentation -> "
                    "DDP MoCo with queue and momentum encoder -> Prometheus.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_parser(sub)
    add_train_parser(sub)
    from .cli_eval import add_eval_parser

    add_eval_parser(sub)
    from .cli_shards import add_shards_parser

    add_shards_parser(sub)
    from .cli_export import add_export_parser

    add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mask_logs()  # shard URLs in log lines keep no password or signature
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except Exception as e:
        if getattr(e, "user_error", False) or isinstance(e, (FileNotFoundError, PermissionError)):
            print(f"mocostream: error: {mask_text(str(e))}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
