"""`mixer finetune --from CHECKPOINT --data ... [--img-size N | H W]`: a new zero-initialised head, the fine-tuning
recipe, and optionally a higher resolution (paper Appendix C, SPEC §5)."""

from __future__ import annotations

import argparse
import warnings

from ..recipes import RESIZE_METHODS, get_recipe
from .train import add_training_flags, check_data_given, recipe_overrides


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Fine-tune a checkpoint (official .npz, timm, ours, or a run directory): "
        "its head is replaced by a zero-initialised one for the new classes, and it trains with "
        "the `finetune` recipe (SGD momentum 0.9, cosine with warm-up, clip 1, no weight decay) "
        "at the checkpoint's own input size, or at --img-size N (or H W): the model is first converted "
        "to that size (`mlpmixer.resize_to`, the paper's block-diagonal token MLPs for an integer "
        "multiple of its size)."
    )
    p.add_argument("--from", dest="init_from", required=True, metavar="CHECKPOINT", help="checkpoint or run directory")
    add_training_flags(p, "finetune", without=("--model",))  # the model is the checkpoint's
    p.add_argument("--resize-method", dest="resize_method", choices=RESIZE_METHODS,
                   help="how --img-size converts the token MLPs: blockdiag (the paper's, integer multiples "
                   "of the checkpoint's size; default) or resample (any multiple of the patch, approximate)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train import launch

    overrides = recipe_overrides(args)
    # A preset's size (the paper recipes' 224) is the size it trains a new model at, not a request to
    # convert the checkpoint: without --img-size (or one in --config) it keeps its own size.
    overrides.setdefault("img_size", None)
    if args.resize_method:
        overrides["resize_method"] = args.resize_method
        if overrides["img_size"] is None:  # nothing to convert: it was taken without a word
            warnings.warn(f"--resize-method {args.resize_method} converts the checkpoint to --img-size, which is not "
                          "given: the model keeps its own size.")
    recipe = get_recipe(args.recipe, **overrides)
    check_data_given(recipe, "fine-tune")
    launch(recipe, args.out, resume=args.resume, save_every=args.save_every, keep=args.keep,
          init_from=args.init_from, progress=not args.quiet, profile=args.profile)
    return 0
