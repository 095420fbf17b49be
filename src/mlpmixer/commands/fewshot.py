"""`mixer fewshot CHECKPOINT --data PATH --shots 1,5,10,25`: linear few-shot accuracy (SPEC §4)."""

from __future__ import annotations

import argparse
import json
import math
import warnings
from typing import TYPE_CHECKING, Any, Optional

from ..choices import FEWSHOT_L2, FEWSHOT_SHOTS
from ..recipes import EVAL_MODES, MAX_WORKERS
from . import add_permute_arguments, at_least, run_permutation, warn_empty_classes

if TYPE_CHECKING:  # torch is imported when the command runs: `mixer fewshot --help` needs none of it
    import torch

    from ..model import MlpMixer


def add_common_arguments(p: argparse.ArgumentParser, eval_fraction: float, seed_help: str) -> None:
    """The arguments `fewshot` and `linear-probe` share: model, data, preprocessing, solver; `seed_help`
    says what --seed draws in the command (only fewshot draws support sets)."""
    p.add_argument("checkpoint", help="checkpoint file or run directory (its head is not used)")
    p.add_argument("--data", required=True,
                   help="data source: 'mnist5k', an MNIST IDX folder, an image folder or shards "
                        "(its train/ part where it has train/ and val/)")
    p.add_argument("--eval-data", help="separate evaluation data, its val/ part where it has one "
                                       "(default: the val/ part of --data, else hold out part of it)")
    p.add_argument("--eval-fraction", type=float, default=None,
                   help=f"fraction of each class of --data held out for evaluation (default {eval_fraction}); not "
                        "used with --eval-data or a --data folder with train/ and val/, which bring their own")
    p.set_defaults(default_eval_fraction=eval_fraction)
    p.add_argument("--l2", type=float, default=FEWSHOT_L2, help="ℓ2 regularisation (default 2^10 = 1024)")
    p.add_argument("--eval-mode", choices=EVAL_MODES, default="resmall-crop",
                   help="preprocessing of image folders and shards: resize straight to the model's size, or "
                        "the shorter side to 256/224 of it and a central crop (default, as big_vision's few-shot "
                        "evaluation); in-memory digits are resized whole, as `mixer eval` does")
    p.add_argument("--batch-size", type=at_least(1), default=128, help="images per forward pass (default 128)")
    p.add_argument("--workers", type=at_least(0, MAX_WORKERS), default=2, help="DataLoader worker processes (default 2)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    add_permute_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Fit an ℓ2-regularised least-squares classifier on the frozen pre-logit features of a few "
        "images per class and report its accuracy on the evaluation images: mean ± standard deviation over "
        "several random draws of the support set, for each shot count (SPEC §4, as big_vision does it)."
    )
    add_common_arguments(p, eval_fraction=0.5, seed_help="seed of the support draws, and of the class-by-class "
                         "split of --data into support pool and evaluation images where there is one (default 0)")
    p.add_argument("--shots", default=",".join(map(str, FEWSHOT_SHOTS)),
                   help="comma-separated images per class (default 1,5,10,25)")
    p.add_argument("--draws", type=at_least(1), default=3, help="random support sets per shot count (default 3)")
    p.set_defaults(func=run)


def parse_shots(text: str) -> list[int]:
    try:
        shots = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--shots takes comma-separated whole numbers such as 1,5,10,25, not {text!r}.") from None
    if not shots or min(shots) < 1:
        raise ValueError(f"--shots needs positive numbers of images per class, not {text!r}.")
    return shots


def _open(model: MlpMixer, spec: str, split: str, args: argparse.Namespace) -> tuple[Any, Optional[int]]:
    """The data `spec` as the model's features are extracted from it, and its number of images (None where
    shards do not say)."""
    from ..data import load_tensors, open_source

    cfg = model.config
    # No hold-out here: without --eval-data, the support pool and the evaluation set are split on
    # the features, class by class (`split_pool`). `split` picks train/ or val/ of a folder pair and
    # the train- or t10k- files of an IDX folder; in-memory digits are batched as `mixer eval` does.
    data = load_tensors(spec, split="train" if split == "train" else "test")
    if data is not None:
        return data, len(data)
    from ..sources import ShardDataset  # torchvision: imported only when needed
    from ..transforms import eval_transform

    transform = eval_transform(cfg.img_size, cfg.in_chans, args.eval_mode)
    data = open_source(spec, split=split, holdout=0.0, seed=args.seed, transform=transform)
    if isinstance(data.dataset, ShardDataset):
        # The pool split and the support draws pick by position, and shards come in the order their
        # DataLoader workers interleave them, which --workers changes: the features go in name order.
        data.dataset.keyed = True
    return data, data.num_examples


def _features(model: MlpMixer, data: Any, total: Optional[int], args: argparse.Namespace,
              desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    from ..data import worker_deaths
    from ..evaluate import batches_of
    from ..fewshot import extract_features

    batches = batches_of(data, model, args.batch_size, args.workers)
    permute = run_permutation(args.checkpoint, model.config, args.permute, args.permute_seed)
    if permute is not None:
        batches = ((permute(images), *rest) for images, *rest in batches)
    with worker_deaths("rerun the command"):
        return extract_features(model, batches, desc=desc, total=total)


def train_and_eval_features(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """(train features, train labels, eval features, eval labels, class names) of the command's data,
    from --eval-data or from a stratified hold-out of --data."""
    import torch

    from ..bench import free_cores, resolve_device, set_threads  # resolve_device: an unknown or absent device is one sentence
    from ..checkpoints import load_checkpoint
    from ..fewshot import split_pool
    from ..sources import FolderDataset, check_same_classes, is_split_pair

    # Checked before the features are extracted, which can take hours; the solver would refuse only after.
    if not 0 < args.l2 < math.inf:  # inf fitted zero weights: chance accuracy, and "Infinity" in the JSON
        raise ValueError(f"--l2 must be a positive finite number, not {args.l2}.")
    # A folder with train/ and val/ brings its own evaluation split, as in training.
    eval_spec = args.eval_data or (args.data if is_split_pair(args.data) else None)
    if eval_spec and args.eval_fraction is not None:
        own = "--eval-data" if args.eval_data else f"the val/ part of {args.data}"
        warnings.warn(f"--eval-fraction is not used: the evaluation images are {own}.")
    eval_fraction = args.default_eval_fraction if args.eval_fraction is None else args.eval_fraction
    if not eval_spec and not 0 < eval_fraction < 1:
        raise ValueError(f"--eval-fraction must lie strictly between 0 and 1, not {eval_fraction}.")
    device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    set_threads(free_cores())  # as train does: on a busy machine, threads that lose their core stall the others
    model = load_checkpoint(args.checkpoint).to(device).eval()
    from ..data import warn_if_same_images

    data, total = _open(model, args.data, "train", args)
    names = data.class_names
    if len(names) < 2:  # the fit would predict the one class: 100%, meaning nothing
        raise ValueError(f"{args.data} holds one class ({names[0]}); a linear classifier needs images of two or more.")
    # The evaluation data's classes are checked before the features of either part are extracted.
    if eval_spec:
        eval_data, eval_total = _open(model, eval_spec, "val", args)
        what = f"the val/ part of {eval_spec}" if args.eval_data is None else f"--eval-data {eval_spec}"
        check_same_classes(names, eval_data.class_names, f"the evaluation images ({what})", "the --data images")
        warn_if_same_images(args.data, eval_spec, f"--eval-data {eval_spec} holds the --data images the "
                            "classifier is fitted on")
    feats, labels = _features(model, data, total, args, "features of --data")
    if eval_spec:
        eval_feats, eval_labels = _features(model, eval_data, eval_total, args, f"features of {eval_spec}")
        if not isinstance(getattr(eval_data, "dataset", None), FolderDataset):  # a folder said so of its empty ones
            warn_empty_classes(eval_labels, names, what)
        return feats, labels, eval_feats, eval_labels, names
    pool, held = split_pool(labels, eval_fraction, args.seed)
    # Rounding each class's share can leave one side empty: its accuracy would be NaN, or a fit on nothing.
    for part, side in ((held, "evaluation set"), (pool, "training (support) set")):
        if len(part) == 0:
            raise ValueError(f"Holding out {eval_fraction:g} of each class of {len(labels)} images leaves the "
                             f"{side} empty; choose another --eval-fraction, more data, or --eval-data.")
    # ... or one class's: a class of one image keeps it in the pool at 0.5 (round(0.5) is 0).
    warn_empty_classes(labels[held], names, f"held out from --data {args.data}")
    return feats[pool], labels[pool], feats[held], labels[held], names


def run(args: argparse.Namespace) -> int:
    from ..fewshot import class_label, fewshot_evaluate

    shots = parse_shots(args.shots)
    feats, labels, eval_feats, eval_labels, names = train_and_eval_features(args)
    counts = labels.bincount(minlength=len(names))
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:  # no shot count can help: name the classes
        raise ValueError(f"The support pool (from --data {args.data}) holds no images of "
                         f"{', '.join(class_label(c, names) for c in empty)}; few-shot evaluation needs images of "
                         "every class.")
    # A shot count the smallest class cannot fill is skipped, said once; the others are still reported.
    smallest = int(counts.min())
    images = f"{smallest} image" + ("" if smallest == 1 else "s")
    if max(shots) > smallest:
        too_many = [k for k in shots if k > smallest]
        shots = [k for k in shots if k <= smallest]
        if not shots:
            raise ValueError(f"The smallest class of the support pool has {images}, fewer than any of the "
                             f"shot counts {args.shots}; use fewer shots or more data.")
        warnings.warn(f"skipped {', '.join(map(str, too_many))}-shot: the smallest class of the support pool has "
                      f"{images}.")
    if args.draws > 1 and int(counts.max()) in shots and bool((counts == counts.max()).all()):
        k = int(counts.max())  # every draw takes every image: the same support set each time
        warnings.warn(f"Every class of the support pool has {k} image{'s' * (k != 1)}, so the {k}-shot draws are "
                      "all the same support set (its ± 0 says nothing of the spread); give more data for them to "
                      "differ.")
    results = fewshot_evaluate(feats, labels, eval_feats, eval_labels, shots=shots, num_classes=len(names),
                               l2=args.l2, draws=args.draws, seed=args.seed, class_names=names)
    if args.json:
        print(json.dumps({str(k): r.to_dict() for k, r in results.items()}))
        return 0
    print(f"Linear few-shot accuracy, {len(names)} classes, {len(eval_labels)} evaluation images, "
          f"ℓ2 = {args.l2:g}, {args.draws} draw{'s' if args.draws > 1 else ''}:")
    for k, r in results.items():
        print(f"  {k:>4}-shot  {100 * r.mean:6.2f}% ± {100 * r.std:.2f}")
    return 0
