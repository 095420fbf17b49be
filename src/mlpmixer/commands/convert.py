"""`mixer convert SRC DST`: any supported checkpoint format to any other."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoints import EXTENSIONS, convert
from ..model import MlpMixer
from . import at_least, image_size


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Convert a checkpoint; formats follow the extensions "
        f"({', '.join(EXTENSIONS)}). .npz is the official Flax layout, .pth/.pt/.bin a timm state dict, "
        ".safetensors ours (configuration included). A run directory reads its final model."
    )
    p.add_argument("src", help="checkpoint file or run directory")
    p.add_argument("dst", help="file to write; its extension picks the format")
    p.add_argument("--gelu", choices=["tanh", "exact"], help="override the GELU the source implies")
    p.add_argument("--img-size", type=at_least(1), nargs="+", metavar="N", help="image size (H [W]) for non-square grids")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {}
    if args.gelu:
        overrides["gelu"] = args.gelu
    if args.img_size:
        overrides["img_size"] = image_size(args.img_size)
    model = convert(args.src, args.dst, **overrides)
    print(f"Wrote {model.config.describe()} ({model.num_classes} classes) to {args.dst}.")
    for note in _lost_in(args.dst, model):
        print("Note: " + note)
    return 0


def _lost_in(dst: str, model: MlpMixer) -> list[str]:
    """What a file without our metadata (.npz, timm's formats) cannot carry of `model`, one sentence each."""
    suffix = Path(dst).suffix.lower()
    if suffix == ".safetensors":
        return []
    implied = "tanh" if suffix == ".npz" else "exact"  # what load_checkpoint assumes for this format
    layout = "official .npz" if suffix == ".npz" else "timm-format"
    notes = []
    if model.config.gelu != implied:
        notes.append(f"{layout} files carry no configuration and load with {implied} GELU; this model uses "
                     f"{model.config.gelu} GELU, so load it with gelu='{model.config.gelu}' "
                     f"(mixer convert --gelu {model.config.gelu}) for identical outputs.")
    if getattr(model, "class_names", None):
        notes.append(f"{layout} files carry no class names; keep a .safetensors copy to have predict print them.")
    return notes
