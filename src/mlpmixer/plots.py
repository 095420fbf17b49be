"""Training curves as a PNG: loss and accuracy against steps, from a run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(metrics: str | Path, png: str | Path) -> Path:
    """Two panels (loss; accuracy) with the training and validation curves, written to `png`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = read_metrics(metrics) if Path(metrics).exists() else []
    train = [m for m in rows if "train_loss" in m]
    val = [m for m in rows if "val_top1" in m]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        steps = [m["step"] for m in train]
        ax_loss.plot(steps, [m["train_loss"] for m in train], label="training (as optimised: augmented, smoothed)")
        ax_acc.plot(steps, [100 * m["train_acc"] for m in train], label="training (augmented)")
    if val:
        steps = [m["step"] for m in val]
        ax_loss.plot(steps, [m["val_loss"] for m in val], "o-", label="validation")
        ax_acc.plot(steps, [100 * m["val_top1"] for m in val], "o-", label="validation")
        best = val[-1]["val_top1"]
        ax_acc.set_title(f"accuracy (final validation {100 * best:.2f}%)")
    else:
        ax_acc.set_title("accuracy")
    ax_loss.set_title("loss")
    ax_loss.set_yscale("log")
    for ax, label in ((ax_loss, "loss"), (ax_acc, "top-1 accuracy (%)")):
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))  # 5-digit step labels must not overlap
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if train or val:
            ax.legend()
    fig.tight_layout()
    from .reports import save_figure  # atomic, like every file a run writes

    path = save_figure(fig, png, dpi=100)
    plt.close(fig)
    return path
