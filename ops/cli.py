"""The `mocostream` command: demo, train, eval, shards, export, curate."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from mocostream.pipeline.vocabulary import AUTO, BACKEND_ALIASES, BACKEND_CHOICES

from .cpu_budget import short_openmp_spin
from .exit_deadline import EXIT_DEADLINE_S, exit_within
from .config import CONFIG_ENV, TrainConfig, build_config, mask_logs, mask_text, printable_config, read_config_file
from .options import ChoicesHelp, add_options, values_from


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="run MoCo pretraining (single process or under torchrun)",
                       formatter_class=ChoicesHelp,
                       description="Run MoCo pretraining on a stream of shards. Each option comes from, in "
                                   "rising precedence: its default, the recipe, --config FILE (YAML/TOML/JSON, keys "
                                   "as the long flags; or MOCOSTREAM_CONFIG), an environment variable "
                                   "MOCOSTREAM_<OPTION> (e.g. MOCOSTREAM_BATCH_SIZE=64), the flag.")
    p.add_argument("--config", help="YAML, TOML or JSON file of options (default: $MOCOSTREAM_CONFIG)")
    add_options(p, TrainConfig, checked_later=True)  # parsed and checked by build_config, as file and env values
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration (secrets masked) and exit")
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    config_file = args.config or os.environ.get(CONFIG_ENV)
    file_values = read_config_file(config_file) if config_file else {}
    cfg = build_config(file_values, values_from(args, TrainConfig))
    if args.print_config:
        print(json.dumps(printable_config(cfg), indent=2))
        return 0
    from .train import train  # torch: only a run that trains pays for it, not --print-config or a config error

    summary = train(cfg)
    if summary["rank"] == 0:
        print(json.dumps(summary))
    return 0


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="build shards from generated images and train a few MoCo steps on them",
                       description="The whole pipeline on an embedded default: shards -> two augmented views -> MoCo "
                                   "-> Prometheus metrics. Needs no input; about a minute on 2 CPU cores.")
    p.add_argument("--workdir", default="demo-output", help="where shards, checkpoints and traces go")
    p.add_argument("--steps", type=int, default=40, help="training steps")
    p.add_argument("--backend", default=AUTO, choices=(*BACKEND_CHOICES, *BACKEND_ALIASES),
                   metavar="{" + ",".join(BACKEND_CHOICES) + "}",
                   help="augmentation backend (auto: DALI on a GPU, OpenCV on CPU; as for train)")
    p.add_argument("--metrics-port", type=int, default=9400, help="Prometheus endpoint port (0 = any free port)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from .demo import demo

    demo(args.workdir, steps=args.steps, backend=args.backend, metrics_port=args.metrics_port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mocostream",
        description="Streaming MoCo pretraining: shards on object storage -> two-view augmentation (DALI or "
                    "OpenCV) -> DDP MoCo with queue and momentum encoder -> Prometheus.")
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
    from .cli_curate import add_curate_parser

    add_curate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    short_openmp_spin()  # before anything loads torch's OpenMP runtime
    from .cli_curate import with_default_stage

    parser = build_parser()
    args = parser.parse_args(with_default_stage(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mask_logs()  # shard URLs in log lines keep no password or signature
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    status = 1  # an exception's
    try:
        status = args.func(args)
        return status
    except Exception as e:
        if getattr(e, "user_error", False) or isinstance(e, (FileNotFoundError, PermissionError)):
            print(f"mocostream: error: {mask_text(str(e))}", file=sys.stderr)
            status = 2
            return status
        raise
    finally:
        if argv is None and args.command in ("train", "demo"):  # a process of its own, not a caller's
            exit_within(EXIT_DEADLINE_S, status)


if __name__ == "__main__":
    sys.exit(main())
