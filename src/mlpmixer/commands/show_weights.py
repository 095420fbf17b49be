"""`mixer show-weights CHECKPOINT --out PNG`: pictures of the token-mixing units or stem kernels."""

from __future__ import annotations

import argparse

from . import at_least, check_out_file


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Draw the first token-mixing layer's hidden units of the first blocks as heat maps over "
        "the patch grid, paired greedily (repeatedly the two unpaired units whose weights correlate most "
        "negatively), pairs sorted by spatial frequency (after the paper's Figure 5); or, with --stem, the "
        "patch-embedding kernels as RGB tiles (heat maps for one-channel models)."
    )
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    p.add_argument("--out", required=True, help="picture to write (.png, or .svg/.pdf)")
    p.add_argument("--block", type=int, nargs="+", metavar="I",
                   help="block(s) to draw, counted from 0 (default: the first three)")
    p.add_argument("--max-pairs", type=at_least(1), metavar="N", help="draw at most N pairs per block")
    p.add_argument("--stem", action="store_true", help="draw all the patch-embedding kernels instead (takes no --block or --max-pairs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import check_not_a_run_file, load_checkpoint  # torch and matplotlib: only when needed
    from ..visualize import plot_stem, plot_token_mixing

    if args.stem and (args.block is not None or args.max_pairs is not None):
        raise ValueError("--block and --max-pairs choose token-mixing units, which --stem does not draw; "
                         "leave them out with --stem, or drop --stem.")
    check_out_file(args.out)
    check_not_a_run_file(args.out)  # a run's curves.png, say
    model = load_checkpoint(args.checkpoint)
    if args.stem:
        path = plot_stem(model, args.out)
    else:
        path = plot_token_mixing(model, args.out, blocks=args.block, max_pairs=args.max_pairs)
    print(f"Wrote {path}.")
    return 0
