"""Evaluation reports: per-class accuracy and a confusion-matrix picture, and saving figures."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Sequence, Union

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from .checkpoints import atomic_write

# Predictions or labels: class indices as a tensor, an array or a list.
Labels = Union[torch.Tensor, np.ndarray, Sequence[int]]


def _as_labels(values: Labels, what: str, num_classes: int) -> np.ndarray:
    a = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    a = a.reshape(-1).astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= num_classes):
        raise ValueError(f"The {what} must be class indices in 0…{num_classes - 1}, found {a.min()}…{a.max()}.")
    return a


def confusion_matrix(preds: Labels, labels: Labels, num_classes: int) -> np.ndarray:
    """Counts (num_classes, num_classes): row = true class, column = predicted class."""
    p = _as_labels(preds, "predictions", num_classes)
    t = _as_labels(labels, "labels", num_classes)
    if p.shape != t.shape:
        raise ValueError(f"Got {p.size} predictions for {t.size} labels; pass one prediction per label.")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(preds: Labels, labels: Labels, num_classes: int) -> np.ndarray:
    """Fraction of each class's examples predicted correctly (NaN for a class without examples)."""
    cm = confusion_matrix(preds, labels, num_classes)
    totals = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(cm) / totals, np.nan)


def unique_class_names(names: Sequence[str]) -> list[str]:
    """`names`, with each name that more than one class has followed by its class's index ("crane (class 134)",
    "crane (class 517)": ImageNet names two classes "crane"), so that keyed by name no class is lost."""
    repeated = {name for name, count in Counter(names).items() if count > 1}
    return [f"{name} (class {i})" if name in repeated else name for i, name in enumerate(names)]


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Write a figure atomically; the format follows the extension (PNG when there is none)."""
    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise ValueError(f"Cannot draw a picture as {path.name}: matplotlib writes no .{fmt} files; "
                         "name it .png, .svg or .pdf.")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight"))


def short_class_names(names: Sequence[str], width: int = 18) -> list[str]:
    """Tick labels of at most `width` characters. A long name keeps its start and its end around a "…":
    class names often differ only at the end (great_grey_owl_1, great_grey_owl_2), and cutting the end
    alone would give such classes the same label."""
    head = (width - 1) // 2
    tail = width - 1 - head
    return [s if len(s) <= width else s[:head] + "…" + s[-tail:] for s in names]


def confusion_figure(preds: Labels, labels: Labels, class_names: Sequence[str], title: str = "") -> Figure:
    """The confusion matrix, each row normalised to the true class's count (so the diagonal is the
    per-class accuracy), with the counts written in the cells when there are few classes."""
    n = len(class_names)
    cm = confusion_matrix(preds, labels, n)
    totals = cm.sum(axis=1, keepdims=True)
    # A class without images has no rate: drawn grey, not as the white of a class never predicted right.
    rates = np.where(totals > 0, cm / np.maximum(totals, 1), np.nan)
    named = n <= 40  # beyond that the names overlap; the picture still shows the structure
    # Inches: room for the counts written in the cells (up to 20 classes), for the names (up to 40); for more,
    # cells of a few pixels and text that still reads at a paper's or a notebook's width.
    side = max(4.0, 0.45 * n + 2.0) if n <= 20 else 0.25 * n + 2.0 if named else 10.0
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="0.75")
    im = ax.imshow(rates, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if named:
        names = short_class_names(class_names)
        # parse_math=False: names (folder names) and the title (a data path) are plain text; "$" in them
        # is not mathtext, where a stray "^" or "_" stopped the report with a parse error.
        ax.set_xticks(range(n), names, rotation=90 if n > 10 or max(map(len, names)) > 6 else 0, fontsize=8,
                      parse_math=False)
        ax.set_yticks(range(n), names, fontsize=8, parse_math=False)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    # Without names the ticks are the classes' indices, in the order of the class list.
    unit = "" if named else " (index)"
    ax.set_xlabel("predicted class" + unit)
    ax.set_ylabel("true class" + unit + ("; grey: no images" if (totals == 0).any() else ""))
    acc = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(title or f"Confusion matrix: {cm.sum()} images, accuracy {100 * acc:.2f}%", parse_math=False)
    return fig


def confusion_matrix_png(preds: Labels, labels: Labels, class_names: Sequence[str],
                         path: str | os.PathLike, title: str = "") -> Path:
    """Draw `confusion_figure` to `path`."""
    return save_figure(confusion_figure(preds, labels, class_names, title), path)
