"""Training curves as a PNG: loss and accuracy against steps, from a run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class PlainLogFormatter(LogFormatter):
    """matplotlib's choice of which log-scale ticks to label (minor ones only where few decades show),
    written as plain decimals: 0.2, 1, 2 rather than 2×10⁻¹, 10⁰, 2×10⁰."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        if not super().__call__(x, pos):
            return ""
        # Three significant digits: enough for the linear minor ticks of a range within one decade (0.41, 0.42).
        return np.format_float_positional(x, precision=3, fractional=False, trim="-")


def curves_figure(metrics: str | Path, train_label: str = "training (as optimised)",
                  val_label: str = "validation") -> Figure:
    """Two panels (loss; accuracy) with the training and validation curves, one legend below them."""
    rows = read_metrics(metrics) if Path(metrics).exists() else []
    train = [m for m in rows if "train_loss" in m]
    val = [m for m in rows if "val_top1" in m]
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    if train:
        steps = [m["step"] for m in train]
        ax_loss.plot(steps, [m["train_loss"] for m in train], label=train_label)
        ax_acc.plot(steps, [100 * m["train_acc"] for m in train], label=train_label)
    if val:
        steps = [m["step"] for m in val]
        ax_loss.plot(steps, [m["val_loss"] for m in val], "o-", label=val_label)
        ax_acc.plot(steps, [100 * m["val_top1"] for m in val], "o-", label=val_label)
        ax_acc.set_title(f"accuracy (final validation {100 * val[-1]['val_top1']:.2f}%)")
    else:
        ax_acc.set_title("accuracy")
    ax_loss.set_title("loss")
    ax_loss.set_yscale("log")
    ax_loss.yaxis.set_major_formatter(PlainLogFormatter())
    ax_loss.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))
    for ax, label in ((ax_loss, "loss"), (ax_acc, "top-1 accuracy (%)")):
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))  # 5-digit step labels must not overlap
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if train or val:
        # Both panels share their lines' styles, so one legend serves both. Hung below the figure's
        # area, it can hide no curve; save_figure's tight bounding box takes it in.
        fig.legend(*ax_loss.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0),
                   frameon=False)
    return fig


def plot_curves(metrics: str | Path, png: str | Path, train_label: str = "training (as optimised)",
                val_label: str = "validation") -> Path:
    """Draw `curves_figure` to `png`."""
    from .reports import save_figure  # atomic, like every file a run writes

    return save_figure(curves_figure(metrics, train_label, val_label), png, dpi=100)
