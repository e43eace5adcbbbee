"""`mocostream eval knn|linear`: accuracy of a checkpoint's frozen backbone on a labelled set."""
from __future__ import annotations

import json

from .storage_flags import add_storage_flags, storage_from_args


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="kNN or linear-probe accuracy of a checkpoint on labelled images",
                       description="Evaluate the query encoder's backbone (projection head removed), frozen and "
                                   "in eval mode. DATA is train/ + test/ (or val/) class folders, one class-folder "
                                   "tree (every 5th image per class is a test image), or labelled shards.")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, text in (("knn", "weighted kNN (k 200, T 0.1 as in the reference CIFAR demo)"),
                       ("linear", "linear classifier on frozen features")):
        q = kinds.add_parser(kind, help=text, description=text)
        q.add_argument("--data", required=True, help="labelled images (see `mocostream eval --help`)")
        q.add_argument("--checkpoint", help="checkpoint file, or a folder / s3:// prefix (its latest)")
        q.add_argument("--arch", help="without --checkpoint: evaluate a randomly initialised encoder of this arch")
        q.add_argument("--image-size", type=int, help="input side (default: 32 for *_cifar archs, a ViT checkpoint's "
                                                      "training size, else 224)")
        q.add_argument("--device", default="cpu", help="cpu or cuda")
        q.add_argument("--max-per-class", type=int, help="at most this many images per class and split")
        add_storage_flags(q, external=True)
        if kind == "knn":
            q.add_argument("--k", type=int, default=200, help="neighbours")
            q.add_argument("--t", type=float, default=0.1, help="temperature of the vote weights")
        else:
            add_linear_flags(q)
        q.set_defaults(func=run_eval)


def add_linear_flags(q) -> None:
    q.add_argument("--protocol", default="features", choices=("features", "reference"),
                   help="features: a classifier on cached, unaugmented features (fast); reference: the paper's "
                        "protocol (main_lincls.py): images streamed every epoch with RandomResizedCrop + flip, "
                        "SGD lr 30, no weight decay, lr x0.1 at 60%% and 80%% of the epochs, top-1/top-5; "
                        "one device or torchrun")
    q.add_argument("--epochs", type=int, default=100, help="epochs of the linear classifier")
    q.add_argument("--lr", type=float, help="its learning rate (features: 0.1; reference: 30 per 256 images)")
    q.add_argument("--batch-size", type=int, default=256, help="reference: images per rank per step")
    q.add_argument("--workers", type=int, help="reference: decode/augmentation processes per rank (default: the "
                                               "rank's CPU budget, as for train)")
    q.add_argument("--num-classes", type=int, help="reference on labelled shards: the number of classes")
    q.add_argument("--out", help="reference: write the trained classifier here (local or s3://)")
    q.add_argument("--seed", type=int, default=0, help="reference: seed of the order, augmentation and classifier")


def budget_workers(device: str) -> int:
    """Decode processes per rank from the rank's CPU budget (affinity, cgroup quota, LOCAL_WORLD_SIZE), split
    as training splits it: not one per CPU of the whole node."""
    import torch

    from .cpu_budget import detect_budget, split_threads

    on_gpu = device != "cpu" and torch.cuda.is_available()
    return split_threads(detect_budget(), on_gpu).loader


def run_eval(args) -> int:
    from .evaluate import evaluate, evaluate_reference

    storage = storage_from_args(args)
    if args.kind == "linear" and args.protocol == "reference":
        workers = args.workers if args.workers is not None else budget_workers(args.device)
        result = evaluate_reference(args.data, args.checkpoint, args.arch, args.image_size or 224, args.device,
                                    args.epochs, 30.0 if args.lr is None else args.lr, args.batch_size,
                                    workers, args.num_classes, args.out, args.seed, storage=storage)
        if result is not None:  # rank 0
            print(json.dumps(result))
        return 0
    extra = {"k": args.k, "t": args.t} if args.kind == "knn" else \
        {"epochs": args.epochs, "lr": 0.1 if args.lr is None else args.lr}
    result = evaluate(args.kind, args.data, args.checkpoint, args.arch, args.image_size, args.device,
                      max_per_class=args.max_per_class, storage=storage, **extra)
    print(json.dumps(result))
    return 0
