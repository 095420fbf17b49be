"""`mixer info`: the variants of paper Table 1 with their sizes and costs."""

from __future__ import annotations

import argparse
import json

from ..variants import PAPER_VARIANTS, variant_config
from . import at_least


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="table of the Mixer variants: shapes, parameters, GFLOPs")
    p.add_argument("--img-size", type=at_least(1), default=224, help="resolution for S and GFLOPs (default 224)")
    p.add_argument("--num-classes", type=at_least(0), default=1000, help="head size counted in the parameters")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def rows(img_size: int = 224, num_classes: int = 1000) -> list[dict]:
    out = []
    for name in PAPER_VARIANTS:
        c = variant_config(name, img_size=img_size, num_classes=num_classes)
        out.append(dict(
            variant=f"Mixer-{name}", layers=c.num_blocks, patch=c.patch_size[0], C=c.hidden_dim,
            S=c.num_tokens, D_S=c.tokens_mlp_dim, D_C=c.channels_mlp_dim, params=c.num_params(),
            gflops=2 * c.macs() / 1e9,
        ))
    return out


def run(args: argparse.Namespace) -> int:
    table = rows(args.img_size, args.num_classes)
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    print(f"{'variant':<12}{'layers':>7}{'patch':>6}{'C':>6}{'S':>6}{'D_S':>6}{'D_C':>6}"
          f"{'params':>14}{'GFLOPs':>9}")
    for r in table:
        print(f"{r['variant']:<12}{r['layers']:>7}{r['patch']:>6}{r['C']:>6}{r['S']:>6}{r['D_S']:>6}"
              f"{r['D_C']:>6}{r['params']:>14,}{r['gflops']:>9.1f}")
    print(f"Parameters with a {args.num_classes}-class head; GFLOPs = 2 × multiply-accumulates of one "
          f"forward pass at {args.img_size}×{args.img_size}.")
    return 0
