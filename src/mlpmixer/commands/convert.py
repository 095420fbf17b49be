"""`mixer convert SRC DST`: any supported checkpoint format to any other."""

from __future__ import annotations

import argparse

from ..checkpoints import EXTENSIONS, TORCH_EXTENSIONS, convert


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between the official .npz, timm and our .safetensors formats",
        description="Convert a checkpoint; formats follow the extensions "
        f"({', '.join(EXTENSIONS)}). .npz is the official Flax layout, .pth/.pt/.bin a timm state dict, "
        ".safetensors ours (configuration included). A run directory reads its final model.",
    )
    p.add_argument("src", help="checkpoint file or run directory")
    p.add_argument("dst", help="file to write; its extension picks the format")
    p.add_argument("--gelu", choices=["tanh", "exact"], help="override the GELU the source implies")
    p.add_argument("--img-size", type=int, nargs="+", metavar="N", help="image size (H [W]) for non-square grids")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {}
    if args.gelu:
        overrides["gelu"] = args.gelu
    if args.img_size:
        overrides["img_size"] = tuple(args.img_size) if len(args.img_size) == 2 else args.img_size[0]
    model = convert(args.src, args.dst, **overrides)
    print(f"Wrote {model.config.describe()} ({model.num_classes} classes) to {args.dst}.")
    if args.dst.lower().endswith(TORCH_EXTENSIONS) and model.config.gelu == "tanh":
        print("Note: timm-format files carry no configuration and load with exact GELU (as timm computes); "
              "this model uses tanh GELU, so load it with gelu='tanh' for identical outputs.")
    return 0
