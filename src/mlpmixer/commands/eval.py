"""`mixer eval RUN_OR_CHECKPOINT --data PATH [--json]`: top-1 and top-5 accuracy."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="top-1 / top-5 accuracy of a checkpoint or run on a dataset")
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    p.add_argument("--data", required=True,
                   help="mnist5k (the embedded digits), a folder of MNIST IDX files, an image folder or shards")
    p.add_argument("--mode", choices=["resize", "resmall-crop"], default="resize",
                   help="preprocessing of image folders and shards (SPEC §4; default resize)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (image folders and shards)")
    p.add_argument("--json", action="store_true", help="print one JSON object: top1, top5 (fractions), n, loss")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import load_checkpoint
    from ..data import TensorData
    from ..evaluate import evaluate, open_eval_data

    model = load_checkpoint(args.checkpoint)
    if model.num_classes == 0:
        raise ValueError(f"{args.checkpoint} has no classification head; evaluate a model with one.")
    data = open_eval_data(args.data, model, args.mode, args.workers)
    names = data.class_names
    if len(names) != model.num_classes:
        raise ValueError(f"{args.data} has {len(names)} classes but the model predicts {model.num_classes}; "
                         "evaluate on data with the model's classes.")
    if model.class_names and list(model.class_names) != list(names):
        raise ValueError(f"The classes of {args.data} ({', '.join(names[:5])}, ...) differ from the model's "
                         f"({', '.join(model.class_names[:5])}, ...); evaluate on data with the model's classes.")
    m = evaluate(model, data, batch_size=args.batch_size, workers=args.workers, progress=not args.json)
    if args.json:
        print(json.dumps({"top1": m["top1"], "top5": m["top5"], "n": m["n"], "loss": m["loss"],
                          "checkpoint": str(args.checkpoint), "data": args.data}))
    else:
        kind = "images" if isinstance(data, TensorData) else "images"
        print(f"{model.config.describe()} on {args.data} ({m['n']} {kind}): top-1 {m['top1']:.2%}, "
              f"top-5 {m['top5']:.2%}, loss {m['loss']:.4f}")
    return 0
