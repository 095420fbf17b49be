"""Export a Mixer for deployment: ONNX, TorchScript or a torch.export ExportedProgram.

Every format takes a dynamic batch size; the resolution is the model's own (a Mixer's token MLP
fixes it, SPEC §5: convert with `mixer resize` first for another one). The model's input check
only looks at the channel and spatial sizes, which are static, so it traces and exports as is.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import warnings
from pathlib import Path
from typing import Callable

import torch

from .checkpoints import atomic_write
from .choices import EXPORT_FORMATS as FORMATS
from .choices import EXPORT_SUFFIXES as SUFFIXES
from .model import MlpMixer

ACCEPTED_SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".ts"), "exported-program": (".pt2",)}


class ExportError(ValueError):
    """An export that cannot be done as asked."""


def _require(module: str):
    """Import an optional export dependency, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(
            f"ONNX export needs the {module} package; install it with pip install 'mlpmixer[export]'."
        ) from None


def _example(model: MlpMixer, batch: int = 2) -> torch.Tensor:
    cfg = model.config
    return torch.randn(batch, cfg.in_chans, *cfg.img_size)


def export_model(model: MlpMixer, fmt: str, out: str | os.PathLike, opset: int = 18) -> Path:
    """Write `model` (in eval mode, fp32, on the CPU) to `out` in format `fmt`; returns the path."""
    if fmt not in FORMATS:
        raise ExportError(f"Unknown export format {fmt!r}; use one of {', '.join(FORMATS)}.")
    # torch.export.load needs .pt2, say (a folder is atomic_write's to refuse).
    if not Path(out).is_dir() and Path(out).suffix.lower() not in ACCEPTED_SUFFIXES[fmt]:
        raise ExportError(f"{'An' if fmt[0] in 'aeiou' else 'A'} {fmt} file is named {' or '.join(ACCEPTED_SUFFIXES[fmt])}: name it "
                          f"{Path(out).with_suffix(SUFFIXES[fmt]).name} instead of {Path(out).name}.")
    model = copy.deepcopy(model).float().cpu().eval()  # the caller's model keeps its dtype, device and mode
    x = _example(model)
    writer = {"onnx": _onnx, "torchscript": _torchscript, "exported-program": _exported_program}[fmt]
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing warns about the shape checks becoming constants: they only read static sizes.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # Recent PyTorch marks torch.jit deprecated; TorchScript is still what its users load.
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)
        return atomic_write(out, lambda tmp: writer(model, x, tmp, opset))


def _onnx(model: MlpMixer, x: torch.Tensor, path: str, opset: int) -> None:
    newest = _require("onnx").defs.onnx_opset_version()
    if not 1 <= opset <= newest:  # the torch.export-based exporter would write a file no runtime loads
        raise ExportError(f"ONNX opset {opset} is not one the installed onnx package knows (1 to {newest}); "
                          "the default, 18, works.")
    # The exporter torch recommends for its version: torch.export-based where it is the default (torch >= 2.9;
    # a graph of fewer, fused nodes, though about 10x slower to write), TorchScript-based before that (torch
    # 2.4 has no other; in 2.5-2.8 the new one was still being built). Both give a symbolic batch size.
    dynamo = inspect.signature(torch.onnx.export).parameters.get("dynamo")
    if dynamo is not None and dynamo.default is True:
        # external_data=False: one file (weights inside, as the older exporter writes them; H/14 fits in
        # ONNX's 2 GB), not a second one named after the temporary file that atomic_write renames.
        extra = {"dynamo": True, "verbose": False, "external_data": False,
                 "dynamic_shapes": {"x": {0: torch.export.Dim("batch", min=1)}}}
    else:
        extra = {"dynamic_axes": {"images": {0: "batch"}, "logits": {0: "batch"}}}
        if dynamo is not None:
            extra["dynamo"] = False
    try:
        torch.onnx.export(model, (x,), path, input_names=["images"], output_names=["logits"], opset_version=opset,
                          **extra)
    except Exception as e:  # the exporter's own errors, e.g. "Unsupported onnx_opset_version: 99"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"ONNX export at opset {opset} failed ({first}); the default, 18, works.") from None


def _torchscript(model: MlpMixer, x: torch.Tensor, path: str, opset: int) -> None:
    traced = torch.jit.trace(model, (x,), check_trace=False)
    torch.jit.save(traced, path)


def _exported_program(model: MlpMixer, x: torch.Tensor, path: str, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, path)


def load_exported(path: str | os.PathLike, fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable images -> logits from an exported file (for checks and tests).

    Only for files you wrote or trust: torch.export.load unpickles parts of a .pt2 file (seen: torch 2.4-2.7
    always, 2.14 when loading them with weights_only fails), and a TorchScript file holds code that runs.
    """
    path = str(path)
    if fmt == "onnx":
        session = _require("onnxruntime").InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    if fmt == "torchscript":
        return torch.jit.load(path)
    if fmt == "exported-program":
        return torch.export.load(path).module()
    raise ExportError(f"Unknown export format {fmt!r}; use one of {', '.join(FORMATS)}.")
