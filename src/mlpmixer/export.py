"""Export a Mixer for deployment: ONNX, TorchScript or a torch.export ExportedProgram.

Every format takes a dynamic batch size; the resolution is the model's own (a Mixer's token MLP
fixes it, SPEC §5: convert with `mixer resize` first for another one). The model's input check
only looks at the channel and spatial sizes, which are static, so it traces and exports as is.
Every file is reloaded and checked against PyTorch before it replaces `out`, so a file that fails
the check never lands there and an older file of that name stays.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .checkpoints import atomic_write, remove_temporaries
from .choices import EXPORT_FORMATS as FORMATS
from .choices import EXPORT_SUFFIXES as SUFFIXES
from .model import MlpMixer
from .permute import FixedPermutation

ACCEPTED_SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".ts"), "exported-program": (".pt2",)}
# The bound on the reloaded file's outputs against PyTorch's (relative, over the batch).
TOLERANCE = 1e-4
# The model's class names in an exported file, a JSON list: the ONNX metadata key and the archives' extra file.
CLASS_NAMES_KEY = "class_names.json"


class ExportError(ValueError):
    """An export that cannot be done as asked."""


@dataclass(frozen=True)
class ExportedFile:
    """A written, checked export: where it is and how far its outputs are from PyTorch's (relative)."""

    path: Path
    relative_error: float


class PermutedInput(torch.nn.Module):
    """A run's fixed pixel permutation (paper Figure 4) in front of its model, so that the exported file
    takes images as they are: without it, a deployed permuted-run model would get unpermuted images and
    give wrong predictions without any error."""

    def __init__(self, model: MlpMixer, permutation: FixedPermutation) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("index", permutation.index.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # named x, as MlpMixer.forward: dynamic_shapes name it
        return self.model(x.flatten(-2)[..., self.index].view_as(x))


def _require(module: str):
    """Import an optional export dependency, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(
            f"ONNX export and its check need the {module} package; install it with pip install 'mlpmixer[export]'."
        ) from None


def _uses_torch_export_exporter() -> bool:
    """Whether torch.onnx.export defaults to its torch.export-based exporter (torch >= 2.9), which needs onnxscript."""
    dynamo = inspect.signature(torch.onnx.export).parameters.get("dynamo")
    return dynamo is not None and dynamo.default is True


def _example(model: MlpMixer, batch: int = 2) -> torch.Tensor:
    cfg = model.config
    return torch.randn(batch, cfg.in_chans, *cfg.img_size)


def export_model(model: MlpMixer, fmt: str, out: str | os.PathLike, opset: int = 18,
                 permutation: FixedPermutation | None = None) -> ExportedFile:
    """Write `model` (in eval mode, fp32, on the CPU) to `out` in format `fmt`, with `permutation` (the fixed
    one its run was trained with, if any) built in, after checking the file against PyTorch. Its class names,
    where it has them, go with it as a JSON list (`CLASS_NAMES_KEY`): in the ONNX file's metadata_props, and
    as an extra file of the TorchScript and torch.export archives."""
    if fmt not in FORMATS:
        raise ExportError(f"Unknown export format {fmt!r}; use one of {', '.join(FORMATS)}.")
    # torch.export.load needs .pt2, say (a folder is atomic_write's to refuse).
    if not Path(out).is_dir() and Path(out).suffix.lower() not in ACCEPTED_SUFFIXES[fmt]:
        raise ExportError(f"{'An' if fmt[0] in 'aeiou' else 'A'} {fmt} file is named {' or '.join(ACCEPTED_SUFFIXES[fmt])}: name it "
                          f"{Path(out).with_suffix(SUFFIXES[fmt]).name} instead of {Path(out).name}.")
    if fmt == "onnx":
        # Before the export (seconds to minutes), not after: each is needed to write or to check the file.
        newest = _require("onnx").defs.onnx_opset_version()
        _require("onnxruntime")
        if _uses_torch_export_exporter():
            _require("onnxscript")
        if not 1 <= opset <= newest:  # the torch.export-based exporter would write a file no runtime loads
            raise ExportError(f"ONNX opset {opset} is not one the installed onnx package knows (1 to {newest}); "
                              "the default, 18, works.")
    model = copy.deepcopy(model).float().cpu().eval()  # the caller's model keeps its dtype, device and mode
    program = model if permutation is None else PermutedInput(model, permutation).eval()
    x = _example(model)
    writer = {"onnx": _onnx, "torchscript": _torchscript, "exported-program": _exported_program}[fmt]
    names = json.dumps(list(model.class_names)) if model.class_names else None
    errors: list[float] = []

    def write_and_check(tmp: str) -> None:
        writer(program, x, tmp, opset, names)
        errors.append(_check(program, tmp, fmt, opset, x.shape[1:]))

    with torch.no_grad(), warnings.catch_warnings():
        # Tracing warns about the shape checks becoming constants: they only read static sizes.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # Recent PyTorch marks torch.jit deprecated; TorchScript is still what its users load.
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)
        try:
            if Path(out).parent.is_dir():  # what an export of this name that was killed left
                remove_temporaries(Path(out).parent, of=Path(out).name)
            path = atomic_write(out, write_and_check)
        except PermissionError:
            raise ExportError(f"Cannot write to {Path(out).parent}: permission denied; choose another "
                              "output file.") from None
    return ExportedFile(path, errors[0])


def _check(program: torch.nn.Module, path: str, fmt: str, opset: int, image_shape: torch.Size) -> float:
    """The file's largest relative error against `program` at batch sizes 1 and 3 (it was traced with 2);
    an ExportError where it does not load or run, or differs by more than TOLERANCE."""
    if fmt == "onnx":
        written = next(o.version for o in _require("onnx").load(path, load_external_data=False).opset_import
                       if o.domain in ("", "ai.onnx"))
        if written != opset:  # torch's exporter keeps its own opset where it cannot convert to the one asked for
            raise ExportError(f"torch's ONNX exporter wrote opset {written} instead of {opset}, which it cannot "
                              "convert this model to; use the default, 18, or another opset it writes.")
    try:
        run = load_exported(path, fmt)
        pairs = [(run(x), program(x)) for x in (torch.randn(batch, *image_shape) for batch in (1, 3))]
    except Exception as e:  # a file its runtime refuses (an ONNX opset without an operator it needs, say)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"The exported file did not run ({first}); nothing was written."
                          + (" The default --opset, 18, works." if fmt == "onnx" and opset != 18 else "")) from None
    worst = max(((got - ref).norm() / ref.norm().clamp_min(1e-12)).item() if got.shape == ref.shape else float("inf")
                for got, ref in pairs)
    if not worst <= TOLERANCE:
        raise ExportError(f"The exported file's outputs differ from PyTorch's by {worst:.1e} (relative, more than "
                          f"{TOLERANCE:g}); nothing was written. Please report it with the checkpoint.")
    ref = pairs[1][1]
    if torch.equal(ref, ref[:1].expand_as(ref)):  # a zero head (new, untrained): the same logits for any image
        warnings.warn("the model's logits do not depend on the image (its head is zero, as a new head is), so the "
                      "check compared only the head's bias; export a trained model to check the rest.")
    return worst


def _onnx(model: torch.nn.Module, x: torch.Tensor, path: str, opset: int, names: str | None) -> None:
    # The exporter torch recommends for its version: torch.export-based where it is the default (torch >= 2.9;
    # a graph of fewer, fused nodes, though about 10x slower to write), TorchScript-based before that (torch
    # 2.4 has no other; in 2.5-2.8 the new one was still being built). Both give a symbolic batch size.
    if _uses_torch_export_exporter():
        # external_data=False: one file (weights inside, as the older exporter writes them; H/14 fits in
        # ONNX's 2 GB), not a second one named after the temporary file that atomic_write renames.
        extra = {"dynamo": True, "verbose": False, "external_data": False,
                 "dynamic_shapes": {"x": {0: torch.export.Dim("batch", min=1)}}}
    else:
        extra = {"dynamic_axes": {"images": {0: "batch"}, "logits": {0: "batch"}}}
        if "dynamo" in inspect.signature(torch.onnx.export).parameters:
            extra["dynamo"] = False
    try:
        with _quiet("torch.onnx", "onnxscript"):
            torch.onnx.export(model, (x,), path, input_names=["images"], output_names=["logits"],
                              opset_version=opset, **extra)
    except Exception as e:  # the exporter's own errors, e.g. "Unsupported onnx_opset_version: 99"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"ONNX export at opset {opset} failed ({first}); the default, 18, works.") from None
    if names is not None:
        onnx = _require("onnx")
        proto = onnx.load(path)
        proto.metadata_props.add(key=CLASS_NAMES_KEY, value=names)
        onnx.save(proto, path)


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Hold back the warnings of these loggers: below opset 18 torch's exporter and onnxscript's version
    converter log a warning each and a converter's traceback, where the opset check after the export says
    in one sentence what went wrong."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _torchscript(model: torch.nn.Module, x: torch.Tensor, path: str, opset: int, names: str | None) -> None:
    traced = torch.jit.trace(model, (x,), check_trace=False)
    torch.jit.save(traced, path, _extra_files={CLASS_NAMES_KEY: names} if names is not None else None)


def _exported_program(model: torch.nn.Module, x: torch.Tensor, path: str, opset: int, names: str | None) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, path, extra_files={CLASS_NAMES_KEY: names} if names is not None else None)


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
