"""`mixer eval RUN_OR_CHECKPOINT --data PATH [--json] [--report DIR]`: top-1 and top-5 accuracy, and on
request per-class accuracy and a confusion-matrix picture."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Optional

from ..recipes import EVAL_MODES, MAX_WORKERS
from . import add_permute_arguments, at_least, run_eval_mode, run_permutation, run_recipe, warn_empty_classes


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Top-1 / top-5 accuracy of a checkpoint or run directory on a dataset; with "
        "--report DIR also per-class accuracy (DIR/per_class.json) and the confusion matrix "
        "(DIR/confusion.png)."
    )
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    p.add_argument("--data", "--eval-data", dest="data",
                   help="mnist5k (the embedded digits), a folder of MNIST IDX files, an image folder or shards "
                   "(alias --eval-data, as train, fewshot and linear-probe name it); default for a run: the images "
                   "it validated on (its --eval-data, the val/ of a train/ + val/ folder, or its hold-out)")
    p.add_argument("--eval-mode", "--mode", dest="mode", choices=EVAL_MODES,
                   help="preprocessing of image folders and shards (SPEC §4; default: the one a run validated "
                   "with, else resize); in-memory digits are always resized to the model's size")
    p.add_argument("--report", metavar="DIR", help="write DIR/per_class.json and DIR/confusion.png")
    add_permute_arguments(p)
    p.add_argument("--batch-size", type=at_least(1), default=500, help="images per forward pass (default 500)")
    p.add_argument("--workers", type=at_least(0, MAX_WORKERS), default=2, help="DataLoader workers (image folders and shards; default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object: top1, top5 (fractions; top5 null for 5 "
                   "classes or fewer, which it would hold all of), n, loss, "
                   "checkpoint, data, eval_mode (and part, which part of the data a run's own validation images "
                   "are, without --data; permute, permute_seed for a permuted run; per_class, a class "
                   "name -> accuracy object, with --report; a name several classes share gets \" (class I)\")")
    p.set_defaults(func=run)


def _nan_to_none(x: float) -> Optional[float]:
    return None if math.isnan(x) else float(x)  # JSON has no NaN: a class without images gets null


def run(args: argparse.Namespace) -> int:
    from ..bench import free_cores, set_threads
    from ..checkpoints import atomic_write, check_writable_folder, load_checkpoint
    from ..data import warn_if_same_images, worker_deaths
    from ..evaluate import applied_eval_mode, evaluate, open_eval_data, open_run_validation
    from ..reports import confusion_matrix_png, per_class_accuracy, unique_class_names
    from ..sources import FolderDataset

    if args.report:  # checked before the evaluation, which can take hours
        check_writable_folder(args.report, "--report")
    set_threads(free_cores())  # as train does: on a busy machine, threads that lose their core stall the others
    model = load_checkpoint(args.checkpoint)
    if model.num_classes == 0:
        raise ValueError(f"{args.checkpoint} has no classification head; give it one with mixer finetune --from "
                         f"{args.checkpoint} --data DATA, or measure its features with mixer fewshot or linear-probe.")
    recipe = run_recipe(args.checkpoint)
    mode = run_eval_mode(args.checkpoint, args.mode)
    if args.data is None:  # the run's own validation images
        if not recipe:
            raise ValueError(f"{args.checkpoint} is not a mixer train run (no run's config.json beside it) with "
                             "validation images of its own; give --data.")
        data, spec, part = open_run_validation(recipe, model, mode, args.workers)
        data_name = source = part
    else:
        spec, part = args.data, None
        data_name, source = spec, f"--data {spec}"
        # Evaluated whole, the data the run trained on hold the images it trained on, unless they are a train/ +
        # val/ pair (read at val/) or an IDX folder with both train- and t10k- files (read at t10k-).
        warn_if_same_images(recipe.get("data"), args.data, f"the run trained on {args.data}")
        data = open_eval_data(args.data, model, mode, args.workers)
    mode = applied_eval_mode(data, mode)  # the JSON and the report name the preprocessing that ran
    names = data.class_names  # evaluate() checks that they are the model's

    cfg = model.config
    permute = run_permutation(args.checkpoint, cfg, args.permute, args.permute_seed)

    with worker_deaths("rerun the command"):  # the labels say which classes had no images (16 bytes an image, with the top-1)
        m = evaluate(model, data, batch_size=args.batch_size, workers=args.workers, progress=not args.json,
                     transform=permute, predictions=True, name=data_name)
    # Opening an image folder said so of its empty class folders; IDX files and shards show theirs only now.
    if not isinstance(getattr(data, "dataset", None), FolderDataset):
        warn_empty_classes(m["labels"], names, source)
    result: dict[str, Any] = {"top1": m["top1"], "top5": m["top5"], "n": m["n"], "loss": m["loss"],
                              "checkpoint": str(args.checkpoint), "data": spec, "eval_mode": mode}
    if part is not None:  # the run's own validation images: which part of the data they are
        result["part"] = part
    if permute is not None:
        result["permute"], result["permute_seed"] = permute.mode, permute.seed
    if args.report:
        out = Path(args.report)
        out.mkdir(parents=True, exist_ok=True)
        accuracy = per_class_accuracy(m["preds"], m["labels"], len(names))
        counts = m["labels"].bincount(minlength=len(names)).tolist()
        # Keyed by name, two classes of one name (ImageNet's two "crane"s) would be one: repeated names are told apart.
        keys = unique_class_names(names)
        result["per_class"] = {key: _nan_to_none(a) for key, a in zip(keys, accuracy)}
        report = {**result, "classes": [{"name": name, "accuracy": _nan_to_none(a), "n": n}
                                        for name, a, n in zip(names, accuracy, counts)]}
        del report["per_class"]  # "classes" says the same with the counts
        atomic_write(out / "per_class.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + "\n"))
        confusion_matrix_png(m["preds"], m["labels"], keys, out / "confusion.png",
                             title=f"{cfg.describe()} on {data_name}: {m['n']} images, top-1 {m['top1']:.2%}")
    if args.json:
        print(json.dumps(result))
        return 0
    extra = f", permuted ({permute.mode}, seed {permute.seed})" if permute is not None else ""
    top5 = f"top-5 {m['top5']:.2%}" if m["top5"] is not None else f"no top-5 with {len(names)} classes"
    print(f"{cfg.describe()} on {data_name} ({m['n']} images{extra}): top-1 {m['top1']:.2%}, {top5}, "
          f"loss {m['loss']:.4f}")
    if args.report:
        worst = sorted((a, name) for name, a in result["per_class"].items() if a is not None)[:3]
        print("Lowest per-class accuracy: " + ", ".join(f"{name} {a:.2%}" for a, name in worst)
              + f". Report: {out / 'per_class.json'}, {out / 'confusion.png'}")
    return 0

