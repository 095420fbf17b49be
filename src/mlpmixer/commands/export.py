"""`mixer export CHECKPOINT`: ONNX, TorchScript or ExportedProgram files with a dynamic batch size."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from ..choices import EXPORT_FORMATS, EXPORT_SUFFIXES


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Export a model for deployment at its own resolution (convert it with `mixer resize` "
        "for another one), with a dynamic batch size; the written file is reloaded and checked against "
        "PyTorch on random images."
    )
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="onnx", help="file format (default onnx)")
    p.add_argument("--out", default=None, help="output file (default: next to the checkpoint, or model.* inside a run directory, "
                   + ", ".join(f"{v} for {k}" for k, v in EXPORT_SUFFIXES.items()) + ")")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoints import check_not_the_source, load_checkpoint
    from ..export import export_model, load_exported

    src = Path(args.checkpoint)
    suffix = EXPORT_SUFFIXES[args.format]
    # By default next to the checkpoint, or inside the run directory given: runs/b/model.onnx, not runs/b.onnx.
    default = src / f"model{suffix}" if src.is_dir() else src.with_name(src.stem + suffix)
    out = Path(args.out) if args.out else default
    check_not_the_source(src, out)
    model = load_checkpoint(args.checkpoint).eval()
    path = export_model(model, args.format, out, opset=args.opset)
    # Check the file, at a batch size other than the one it was traced with.
    x = torch.randn(3, model.config.in_chans, *model.config.img_size)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)
            ref = model(x)
            got = load_exported(path, args.format)(x)
    except Exception as e:  # a file its runtime refuses (an ONNX opset without an operator it needs, say)
        path.unlink()
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"The exported file did not run ({first}); it was removed. With --format onnx, the "
                         "default --opset 18 works.") from None
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    h, w = model.config.img_size
    print(f"Wrote {model.config.describe()} as {args.format} to {path} (input: batch×{model.config.in_chans}×{h}×{w}, "
          f"any batch); reloaded, relative error against PyTorch {err:.1e}.")
    if err > 1e-4:
        raise ValueError(f"The exported model's logits differ from PyTorch's by {err:.1e} (relative); "
                         "do not deploy this file — please report it with the checkpoint.")
    if torch.equal(ref, ref[:1].expand_as(ref)):  # a zero head (new, untrained): the same logits for any image
        warnings.warn("the model's logits do not depend on the image (its head is zero, as a new head is), so the "
                      "check above compared only the head's bias; export a trained model to check the rest.")
    return 0
