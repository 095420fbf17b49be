"""`mixer info`: the variants of paper Table 1 with their sizes and costs; `mixer info CHECKPOINT`: what
one checkpoint holds."""

from __future__ import annotations

import argparse
import json
import os

from ..variants import EXTRA_VARIANTS, PAPER_VARIANTS, MixerConfig, canonical_name, variant_config
from . import at_least, image_size


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Without CHECKPOINT, the variants of paper Table 1 with their shapes, parameters "
        "and GFLOPs; with one, its model, input, head and class names."
    )
    p.add_argument("checkpoint", nargs="?", help="a checkpoint file (.npz, timm, .safetensors) or run directory, "
                   "or a variant name (B/16, nano/4, ...) for its row of the table")
    p.add_argument("--img-size", type=at_least(1), nargs="+", default=None, metavar="N",
                   help="resolution of the table's S and GFLOPs (default: each variant's own, 224 for the paper's); with a checkpoint that "
                   "does not say its size (.npz, timm), its H W, which a non-square patch grid needs (2×8 patches would "
                   "read as the square 4×4 of their 16 tokens)")
    p.add_argument("--num-classes", type=at_least(0), default=None,
                   help="head size counted in the table's parameters (default 1000)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def rows(img_size: int | None = None, num_classes: int = 1000,
         names: tuple[str, ...] = tuple(PAPER_VARIANTS)) -> list[dict]:
    """One row per variant, at `img_size` or (None) at the size each variant is built for."""
    out = []
    for name in names:
        c = variant_config(name, num_classes=num_classes, **({"img_size": img_size} if img_size else {}))
        out.append(dict(
            variant=c.describe(), img_size=c.img_size[0], layers=c.num_blocks, patch=c.patch_size[0], C=c.hidden_dim,
            S=c.num_tokens, D_S=c.tokens_mlp_dim, D_C=c.channels_mlp_dim, params=c.num_params(),
            gflops=2 * c.macs() / 1e9,
        ))
    return out


def describe_checkpoint(path: str, img_size: int | tuple[int, int] | None = None) -> dict:
    """The configuration, size, pooling and class names of the checkpoint at `path`, after the checks of loading it
    (the model is not built); `img_size` is the image size of a foreign file (.npz, timm), which says none."""
    from ..checkpoints import check_tensors, read_checkpoint, resolve_path  # torch: only when a checkpoint is read

    file = resolve_path(path)
    # As load_checkpoint(file, img_size=...) takes it, refused for a file made for another size; also a hint, so that
    # a file whose tokens form no square grid says --img-size, as mixer info takes it.
    given = {} if img_size is None else {"img_size": img_size}
    state, config, extra = read_checkpoint(file, img_size_hint=img_size, **given)
    check_tensors(file, state, config)  # a damaged file is refused as load_checkpoint refuses it, not described
    return dict(file=str(file), layout=extra["layout"], run_config=extra.get("run_config"), model=config.describe(),
                config=config.to_dict(), params=config.num_params(), gflops=2 * config.macs() / 1e9,
                global_pool=extra.get("global_pool", "avg"), class_names=extra.get("class_names"))


def _print_checkpoint(info: dict) -> None:
    c = MixerConfig.from_dict(info["config"])
    (h, w), (ph, pw) = c.img_size, c.patch_size
    names = info["class_names"] or []
    shown = ", ".join(names[:10]) + (f", … ({len(names) - 10} more)" if len(names) > 10 else "")
    print(f"{info['file']}: {info['model']}")
    if info["run_config"]:
        print(f"  layout      {info['layout']} of mixer train, configured by {info['run_config']}")
    elif info["layout"] != "mlpmixer":  # what the file does not say was assumed, as load_checkpoint does
        gelu = "the format's" if info["layout"] != "training state" else "assumed exact (no config.json of its run)"
        print(f"  layout      {info['layout']}, weights only: the GELU is {gelu}, the image size comes from "
              "the token count (or --img-size)")
    print(f"  input       {h}×{w}, {c.in_chans} channel{'s' if c.in_chans > 1 else ''}; patch {ph}×{pw}, "
          f"{c.num_tokens} tokens")
    print(f"  blocks      {c.num_blocks} × (token MLP {c.num_tokens} -> {c.tokens_mlp_dim}, channel MLP "
          f"{c.hidden_dim} -> {c.channels_mlp_dim}), {c.gelu} GELU")
    per_token = info["global_pool"] == ""  # the head sees every token (timm's global_pool '')
    if c.num_classes:
        print(f"  head        {c.num_classes} classes{', for each token (no pooling)' if per_token else ''}")
    else:
        print(f"  head        none (features only{', of each token' if per_token else ''})")
    print(f"  class names {shown or 'not in the file'}")
    print(f"  size        {info['params']:,} parameters, {info['gflops']:.3g} GFLOPs per image")


def _variant_name(text: str | None) -> str | None:
    """`text` when it names a variant ('mixer_b16_448' keeps its size) and no file or folder of that name exists."""
    if not text or os.path.exists(text):
        return None
    try:
        canonical_name(text)
    except ValueError:
        return None
    return text


def run(args: argparse.Namespace) -> int:
    variant = _variant_name(args.checkpoint)
    if args.checkpoint and not variant and not os.path.exists(args.checkpoint) and "." not in args.checkpoint:
        # No file, and no extension to say one was meant: more likely a misspelt variant than a wrong path.
        known = ", ".join([*PAPER_VARIANTS, *EXTRA_VARIANTS])
        raise ValueError(f"{args.checkpoint} is neither a checkpoint nor a Mixer variant; give the path of a file or "
                         f"run directory, or one of {known}.")
    if args.checkpoint and not variant:
        if args.num_classes is not None:
            raise ValueError("--num-classes shapes the variants table; a checkpoint has its own head.")
        info = describe_checkpoint(args.checkpoint, image_size(args.img_size) if args.img_size else None)
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            _print_checkpoint(info)
        return 0
    img_size = image_size(args.img_size) if args.img_size else None
    if img_size is not None and not isinstance(img_size, int):
        raise ValueError("The variants table is for square images; give one --img-size.")
    num_classes = 1000 if args.num_classes is None else args.num_classes
    table = rows(img_size, num_classes, (variant,) if variant else tuple(PAPER_VARIANTS))
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    print(f"{'variant':<15}{'layers':>7}{'patch':>6}{'C':>6}{'S':>6}{'D_S':>6}{'D_C':>6}"
          f"{'params':>14}{'GFLOPs':>9}")
    for r in table:
        print(f"{r['variant']:<15}{r['layers']:>7}{r['patch']:>6}{r['C']:>6}{r['S']:>6}{r['D_S']:>6}"
              f"{r['D_C']:>6}{r['params']:>14,}{r['gflops']:>9.3g}")
    head = f"a {num_classes}-class head" if num_classes else "no head"
    side = table[0]["img_size"]  # every paper variant's is 224, unless --img-size gives another
    print(f"Parameters with {head}; GFLOPs = 2 × multiply-accumulates of one forward pass at {side}×{side}.")
    if img_size is not None and img_size != 224:
        print(f"Each variant as built at {img_size}×{img_size}, D_S unchanged; `mixer resize` of a 224 checkpoint "
              "(the paper's method, SPEC §5) widens D_S instead, K² times for K times the side.")
    return 0
