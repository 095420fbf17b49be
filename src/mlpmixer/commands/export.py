"""`mixer export CHECKPOINT`: ONNX, TorchScript or ExportedProgram files with a dynamic batch size."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..choices import EXPORT_FORMATS, EXPORT_SUFFIXES
from ..recipes import RESIZE_METHODS
from . import add_permute_arguments, at_least, check_out_file, image_size, run_permutation


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Export a model for deployment at its own resolution, or at another converted as `mixer resize` "
        "converts it (--img-size), with a dynamic batch size; the file takes pixels scaled to [-1, 1], with the fixed "
        "permutation of a run trained with --permute built in. It is reloaded and checked against PyTorch on "
        "random images before it is moved into place: a file that fails the check is not written."
    )
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="onnx", help="file format (default onnx)")
    p.add_argument("--out", default=None, help="output file (default: next to the checkpoint, or model.* inside a run directory, "
                   + ", ".join(f"{v} for {k}" for k, v in EXPORT_SUFFIXES.items()) + ")")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18; --format onnx only)")
    p.add_argument("--img-size", type=at_least(1), nargs="+", metavar="N",
                   help="export for this image size (N for N×N, or H W), the model converted as `mixer resize` "
                   "does (default: the model's own)")
    p.add_argument("--method", choices=RESIZE_METHODS, default=None,
                   help="with --img-size: blockdiag (paper, integer factors only; default) or resample (approximate)")
    add_permute_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import check_not_the_source, load_checkpoint
    from ..export import CLASS_NAMES_KEY, export_model

    if args.opset is not None and args.format != "onnx":
        raise ValueError(f"--opset sets the ONNX opset; a {args.format} file has none (leave it out, or use --format onnx).")
    if args.method is not None and args.img_size is None:
        raise ValueError("--method says how --img-size converts the model; give --img-size too, or leave --method out.")
    src = Path(args.checkpoint)
    suffix = EXPORT_SUFFIXES[args.format]
    # By default next to the checkpoint, or inside the run directory given: runs/b/model.onnx, not runs/b.onnx.
    default = src / f"model{suffix}" if src.is_dir() else src.with_name(src.stem + suffix)
    out = Path(args.out) if args.out else default
    if not args.out and src.is_file() and out.resolve() == src.resolve():  # a training state, as TorchScript
        raise ValueError(f"The default --out of a {args.format} export of {src} is {out}, the checkpoint itself; "
                         "give --out.")
    check_not_the_source(src, out)
    # An unwritable place (/proc, a read-only folder) is one sentence, not an errno; an existing --out is replaced.
    check_out_file(out)
    model = load_checkpoint(args.checkpoint).eval()
    permutation = run_permutation(args.checkpoint, model.config, args.permute, args.permute_seed)
    if args.img_size is not None:
        from ..resize import resize_to
        from ..variants import as_pair

        size, (h, w) = as_pair(image_size(args.img_size)), model.config.img_size
        if size != (h, w):
            if permutation is not None:  # one made for the new size would be one the model never saw
                raise ValueError(f"The run was trained on images with a fixed '{permutation.mode}' permutation made for "
                                 f"{h}×{w}; export it at that size (leave out --img-size).")
            model = resize_to(model, size, method=args.method or "blockdiag").eval()
    exported = export_model(model, args.format, out, opset=18 if args.opset is None else args.opset, permutation=permutation)
    cfg = model.config
    (h, w), outputs = cfg.img_size, (f"{cfg.num_classes} logits" if cfg.num_classes else f"{cfg.hidden_dim} features")
    built_in = (f"; the run's fixed permutation ({permutation.mode}, seed {permutation.seed}) is built in: give it "
                "images as they are" if permutation is not None else "")
    if model.class_names:
        built_in += f"; its class names are in the file as {CLASS_NAMES_KEY}"
    print(f"Wrote {cfg.describe()} as {args.format} to {exported.path} (input: batch×{cfg.in_chans}×{h}×{w}, any batch, "
          f"pixels in [-1, 1]; output: batch×{outputs}{built_in}); reloaded, relative error against PyTorch "
          f"{exported.relative_error:.1e}.")
    return 0
