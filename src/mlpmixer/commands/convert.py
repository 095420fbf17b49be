"""`mixer convert SRC DST`: any supported checkpoint format to any other."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import at_least, image_size


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Convert a checkpoint; formats follow the extensions: .npz is the official Flax layout, .pth/.pt/.bin "
        "a timm state dict, .safetensors ours (configuration included). A run directory reads its final model."
    )
    p.add_argument("src", help="checkpoint file or run directory")
    p.add_argument("dst", help="file to write; its extension picks the format")
    p.add_argument("--gelu", choices=["tanh", "exact"], help="override the GELU the source implies")
    p.add_argument("--img-size", type=at_least(1), nargs="+", metavar="N", help="image size (H [W]) for non-square grids")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import convert  # torch: only when the command runs

    overrides = {}
    if args.gelu:
        overrides["gelu"] = args.gelu
    if args.img_size:
        overrides["img_size"] = image_size(args.img_size)
    model = convert(args.src, args.dst, **overrides)
    print(f"Wrote {model.config.describe()} ({model.num_classes} classes) to {args.dst}.")
    return 0

