"""`mixer resize CHECKPOINT --img-size N [W] --out PATH`: a checkpoint for another resolution."""

from __future__ import annotations

import argparse
import warnings

from ..recipes import RESIZE_METHODS
from . import at_least, check_out_file, image_size, run_recipe


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Write a copy of CHECKPOINT for another input size. The default method is the paper's "
        "(Appendix C): for a size K_h×K_w times the current one, the token-mixing MLPs become block-diagonal "
        "with one copy of the pre-trained MLP per spatial part, exactly preserving what each part computes. "
        "--method resample (not in the paper) handles other sizes approximately by resampling the "
        "token-MLP weights over the patch grid. See docs/paper-tools.md."
    )
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    p.add_argument("--img-size", type=at_least(1), nargs="+", required=True, metavar="N",
                   help="new image size: N for N×N, or H W")
    p.add_argument("--out", required=True, help="file to write (.safetensors keeps the configuration)")
    p.add_argument("--method", choices=RESIZE_METHODS, default="blockdiag",
                   help="blockdiag (paper, integer factors only; default) or resample (any multiple of the patch, "
                   "approximate)")
    p.add_argument("--mode", choices=["bicubic", "bilinear", "nearest"],
                   help="interpolation for --method resample (default bicubic); the paper's method has none")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import check_not_the_source, load_checkpoint, save_checkpoint  # torch
    from ..resize import resize_to

    if args.mode is not None and args.method != "resample":  # the block-diagonal copies interpolate nothing
        raise ValueError(f"--mode is the interpolation of --method resample; the {args.method} method has none "
                         "(leave --mode out, or add --method resample).")
    size = image_size(args.img_size)
    check_not_the_source(args.checkpoint, args.out)
    check_out_file(args.out)
    model = load_checkpoint(args.checkpoint)
    permute = run_recipe(args.checkpoint).get("permute")  # read before --out is written: an unreadable one stops here
    old = model.config
    new = resize_to(model, size, method=args.method, mode=args.mode or "bicubic")
    save_checkpoint(new, args.out)
    if permute:
        # The commands would build a fresh permutation for the new size, which the model never saw.
        warnings.warn(f"The run was trained on images with a fixed '{permute}' permutation made for "
                      f"{old.img_size[0]}×{old.img_size[1]}; no command applies it to the resized model's images, "
                      "so fine-tune it on unpermuted images, and keep it outside the run folder.")
    c = new.config
    same = " (the checkpoint's own size: the weights are unchanged)" if c.img_size == old.img_size else ""
    print(f"Wrote {c.describe()} at {c.img_size[0]}×{c.img_size[1]} ({c.num_tokens} tokens, token MLP "
          f"{old.tokens_mlp_dim} -> {c.tokens_mlp_dim} wide) to {args.out}{same}.")
    return 0
