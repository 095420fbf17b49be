"""Training curves as a PNG: loss and accuracy against steps, from a run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator

if TYPE_CHECKING:
    from .recipes import Recipe


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def curve_labels(r: Recipe, in_memory: bool) -> tuple[str, str]:
    """Legend entries for the training and validation curves: what the run did to the batches, the network
    and the loss it optimised that the validation pass does not do, and whether validation scored the EMA
    weights. As train.py applies the recipe: in-memory data (the digits, IDX folders) are warped by
    digits_aug alone; image files get the crops, flips, RandAugment or AutoAugment and MixUp/CutMix."""
    if in_memory:
        aug = r.digits_aug
        applied = [("rotations", aug.get("rotate")), ("zooms", aug.get("scale")), ("shifts", aug.get("shift")),
                   ("elastic warps", aug.get("elastic"))]
    else:
        mixes = " or ".join(name for name, alpha in (("MixUp", r.mixup), ("CutMix", r.cutmix)) if alpha > 0)
        applied = [("padded crops", r.pad_crop),
                   # A crop area of (1, 1) leaves nothing to choose: the whole image, resized.
                   ("Inception crops", not r.pad_crop and r.crop_area[0] < 1),
                   ("flips", r.flip), ("RandAugment", r.randaugment is not None),
                   ("AutoAugment", r.autoaugment is not None),
                   (mixes + (f" on {r.mix_prob:.0%} of batches" if r.mix_prob < 1 else ""), mixes and r.mix_prob > 0)]
    applied += [("dropout", r.dropout), ("stochastic depth", r.drop_path), ("label-smoothed loss", r.label_smoothing)]
    done = [name for name, on in applied if on]
    train = f"training (as optimised: {', '.join(done)})" if done else "training (as optimised)"
    return train, "validation (EMA weights)" if r.ema else "validation"


class PlainLogFormatter(LogFormatter):
    """matplotlib's choice of which log-scale ticks to label (minor ones only where few decades show),
    written as plain decimals: 0.2, 1, 2 rather than 2×10⁻¹, 10⁰, 2×10⁰."""

    significant_digits = 3

    def format_ticks(self, values: list[float]) -> list[str]:
        self.set_locs(values)
        labelled = super().__call__  # outside the comprehension, whose own scope a bare super() cannot see
        shown = [x for i, x in enumerate(values) if labelled(x, i)]
        # Three significant digits write the linear minor ticks of a range within one decade (0.41, 0.42); a very
        # short run's loss can span less (2.2975, 2.3, 2.3025): as many as it takes to write each tick exactly.
        exact = (d for d in range(3, 8) if all(np.isclose(float(_plain(x, d)), x, rtol=1e-9, atol=0) for x in shown))
        self.significant_digits = next(exact, 8)
        return [self(x, i) for i, x in enumerate(values)]

    def __call__(self, x: float, pos: int | None = None) -> str:
        if not super().__call__(x, pos):
            return ""
        return _plain(x, self.significant_digits)


def _plain(x: float, significant_digits: int) -> str:
    return np.format_float_positional(x, precision=significant_digits, fractional=False, trim="-")


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
        # A line through one point draws nothing: a run shorter than the logging interval has one.
        marker = "o" if len(train) == 1 else None
        ax_loss.plot(steps, [m["train_loss"] for m in train], marker=marker, label=train_label)
        ax_acc.plot(steps, [100 * m["train_acc"] for m in train], marker=marker, label=train_label)
    if val:
        steps = [m["step"] for m in val]
        # A dot per evaluation while they are few; a hundred (--evals 100) made a band of dots over the training curve.
        marker = "o" if len(val) <= 25 else None
        ax_loss.plot(steps, [m["val_loss"] for m in val], marker=marker, label=val_label)
        ax_acc.plot(steps, [100 * m["val_top1"] for m in val], marker=marker, label=val_label)
        ax_acc.set_title(f"accuracy (final validation {100 * val[-1]['val_top1']:.2f}%)")
    else:
        ax_acc.set_title("accuracy")
    ax_loss.set_title("loss")
    ax_loss.set_yscale("log")
    ax_loss.yaxis.set_major_formatter(PlainLogFormatter())
    # Minor ticks labelled up to two decades (matplotlib < 3.10 stopped at one, leaving 0.2-2.5 with "1" alone).
    ax_loss.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    for ax, label in ((ax_loss, "loss"), (ax_acc, "top-1 accuracy (%)")):
        ax.set_xlabel("step")
        # nbins: 5-digit step labels must not overlap. min_n_ticks: whole steps even where the points span
        # less than two (one evaluation), which MaxNLocator would otherwise divide as 2.96, 3.04.
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True, min_n_ticks=1))
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
    """Draw `curves_figure` to `png`; train.train passes the labels of `curve_labels`."""
    from .reports import save_figure  # atomic, like every file a run writes

    return save_figure(curves_figure(metrics, train_label, val_label), png, dpi=100)
