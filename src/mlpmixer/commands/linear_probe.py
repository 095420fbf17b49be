"""`mixer linear-probe CHECKPOINT --data PATH`: the few-shot solver fitted on all the training data."""

from __future__ import annotations

import argparse
import json
import warnings

from .fewshot import add_common_arguments, train_and_eval_features


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Fit the few-shot evaluation's ℓ2-regularised least-squares classifier (SPEC §4) on the "
        "frozen pre-logit features of every training image and report its accuracy on the evaluation images."
    )
    # Fitted on every training image: the seed draws no support sets, only the hold-out split (see split_pool).
    add_common_arguments(p, eval_fraction=0.2, seed_help="seed of the class-by-class split of --data into "
                         "training and evaluation images (default 0); unused with --eval-data or a folder with "
                         "train/ and val/, which are not split")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..fewshot import class_label, fit_least_squares  # torch: only when the command runs

    feats, labels, eval_feats, eval_labels, names = train_and_eval_features(args)
    for c in (labels.bincount(minlength=len(names)) == 0).nonzero().flatten().tolist():
        warnings.warn(f"The training images hold none of {class_label(c, names)}: the probe can never predict it.")
    probe = fit_least_squares(feats, labels, len(names), args.l2)
    result = {"train_accuracy": probe.accuracy(feats, labels), "accuracy": probe.accuracy(eval_feats, eval_labels),
              "train_images": len(labels), "eval_images": len(eval_labels), "l2": args.l2}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"Linear probe on {len(labels)} training images, {len(names)} classes, ℓ2 = {args.l2:g}: "
          f"{100 * result['accuracy']:.2f}% on {len(eval_labels)} evaluation images "
          f"({100 * result['train_accuracy']:.2f}% on the training images).")
    return 0
