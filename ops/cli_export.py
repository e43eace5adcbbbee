"""`mocostream export`: hand a checkpoint's backbone to torchvision, safetensors or detectron2."""
from __future__ import annotations

import json

from .export_formats import FORMATS
from .storage_flags import add_storage_flags, storage_from_args


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint's backbone as torchvision, timm, safetensors or detectron2 "
                                      "weights",
                       description="Write one encoder's backbone (projection head removed) of a training checkpoint "
                                   "in a format people fine-tune from. Reads the checkpoint without executing "
                                   "anything in it; refuses files that are not mocostream checkpoints.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file, or a folder / s3:// prefix (its latest)")
    p.add_argument("--out", required=True, help="output file (local or s3://); detectron2 wants a .pkl name")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="torchvision: plain state_dict (fc missing by design; ViTs in torchvision's names); timm: "
                        "the same with timm's names (ViTs: timm's VisionTransformer); safetensors: the same with "
                        "metadata; detectron2: its R-18/R-50 names (stem, res2..res5), a .pkl pickle of numpy arrays")
    p.add_argument("--encoder", default="query", choices=("query", "key"),
                   help="the query encoder (trained by SGD, what eval uses) or the momentum key encoder")
    add_storage_flags(p)
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from .export import export

    print(json.dumps(export(args.checkpoint, args.out, args.format, args.encoder, storage_from_args(args))))
    return 0
