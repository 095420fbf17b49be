"""`mixer eval RUN_OR_CHECKPOINT --data PATH [--json] [--report DIR]`: top-1 and top-5 accuracy, and on
request per-class accuracy and a confusion-matrix picture."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Optional

from ..recipes import EVAL_MODES, MAX_WORKERS, PERMUTE_MODES
from . import at_least


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Top-1 / top-5 accuracy of a checkpoint or run directory on a dataset; with "
        "--report DIR also per-class accuracy (DIR/per_class.json) and the confusion matrix "
        "(DIR/confusion.png)."
    )
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    p.add_argument("--data", required=True,
                   help="mnist5k (the embedded digits), a folder of MNIST IDX files, an image folder or shards")
    p.add_argument("--eval-mode", "--mode", dest="mode", choices=EVAL_MODES, default="resize",
                   help="preprocessing of image folders and shards (SPEC §4; default resize); in-memory digits "
                   "are always resized to the model's size")
    p.add_argument("--report", metavar="DIR", help="write DIR/per_class.json and DIR/confusion.png")
    p.add_argument("--permute", choices=[*PERMUTE_MODES, "none"],
                   help="apply the fixed permutation a run was trained with (paper Figure 4); default: the "
                   "one recorded in the run directory's config.json, if any")
    p.add_argument("--permute-seed", type=int, help="seed of that permutation (default: the run's, or 0)")
    p.add_argument("--batch-size", type=at_least(1), default=500)
    p.add_argument("--workers", type=at_least(0, MAX_WORKERS), default=2, help="DataLoader workers (image folders and shards)")
    p.add_argument("--json", action="store_true", help="print one JSON object: top1, top5 (fractions), n, loss "
                   "(and per_class, a class name -> accuracy object, with --report)")
    p.set_defaults(func=run)


def recorded_permutation(checkpoint: str) -> tuple[Optional[str], int]:
    """(mode, seed) of the permutation a `mixer train` run recorded in its config.json, else (None, 0).

    A checkpoint file counts as part of a run when a run's config.json lies beside it."""
    path = Path(checkpoint)
    config = (path if path.is_dir() else path.parent) / "config.json"
    try:
        saved = json.loads(config.read_text())
    except (OSError, ValueError):  # no run's config there: nothing recorded
        return None, 0
    if not isinstance(saved, dict) or "recipe" not in saved:  # another tool's config.json (timm's, say)
        return None, 0
    recipe = saved["recipe"]
    if not isinstance(recipe, dict) or recipe.get("permute") not in (None, *PERMUTE_MODES) \
            or not isinstance(recipe.get("permute_seed") or 0, int):
        raise ValueError(f"{config} is not a run configuration as mixer train writes it (a \"recipe\" object, "
                         "with the permutation the run used); restore it, or move it away.")
    return recipe.get("permute"), recipe.get("permute_seed") or 0


def _nan_to_none(x: float) -> Optional[float]:
    return None if math.isnan(x) else float(x)  # JSON has no NaN: a class without images gets null


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import atomic_write, load_checkpoint
    from ..evaluate import evaluate, open_eval_data
    from ..permute import FixedPermutation
    from ..reports import confusion_matrix_png, per_class_accuracy

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

    mode, seed = recorded_permutation(args.checkpoint)
    mode = args.permute or mode
    seed = seed if args.permute_seed is None else args.permute_seed
    cfg = model.config
    permute = FixedPermutation(mode, cfg.img_size, cfg.patch_size, seed) if mode and mode != "none" else None

    m = evaluate(model, data, batch_size=args.batch_size, workers=args.workers, progress=not args.json,
                 transform=permute, predictions=bool(args.report))
    result: dict[str, Any] = {"top1": m["top1"], "top5": m["top5"], "n": m["n"], "loss": m["loss"],
                              "checkpoint": str(args.checkpoint), "data": args.data}
    if permute is not None:
        result["permute"], result["permute_seed"] = permute.mode, permute.seed
    if args.report:
        out = Path(args.report)
        out.mkdir(parents=True, exist_ok=True)
        accuracy = per_class_accuracy(m["preds"], m["labels"], len(names))
        counts = m["labels"].bincount(minlength=len(names)).tolist()
        result["per_class"] = {name: _nan_to_none(a) for name, a in zip(names, accuracy)}
        report = {**result, "classes": [{"name": name, "accuracy": _nan_to_none(a), "n": n}
                                        for name, a, n in zip(names, accuracy, counts)]}
        del report["per_class"]  # "classes" says the same with the counts
        atomic_write(out / "per_class.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + "\n"))
        confusion_matrix_png(m["preds"], m["labels"], names, out / "confusion.png",
                             title=f"{cfg.describe()} on {args.data}: {m['n']} images, top-1 {m['top1']:.2%}")
    if args.json:
        print(json.dumps(result))
        return 0
    extra = f", permuted ({permute.mode}, seed {permute.seed})" if permute is not None else ""
    print(f"{cfg.describe()} on {args.data} ({m['n']} images{extra}): top-1 {m['top1']:.2%}, "
          f"top-5 {m['top5']:.2%}, loss {m['loss']:.4f}")
    if args.report:
        worst = sorted((a, name) for name, a in result["per_class"].items() if a is not None)[:3]
        print("Lowest per-class accuracy: " + ", ".join(f"{name} {a:.2%}" for a, name in worst)
              + f". Report: {out / 'per_class.json'}, {out / 'confusion.png'}")
    return 0
