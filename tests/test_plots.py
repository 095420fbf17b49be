"""Training curves (curves.png): what the legend says, where it sits, how the log-scale loss axis reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from mlpmixer.plots import curve_labels, curves_figure, plot_curves
from mlpmixer.recipes import get_recipe


def test_a_finetune_is_not_called_augmented():
    # The digits are in memory: no augmentation, smoothing or mixing is applied to them.
    assert curve_labels(get_recipe("finetune"), in_memory=True) == ("training (as optimised)", "validation")
    # Image files get the recipe's Inception crops and flips, and nothing else.
    assert curve_labels(get_recipe("finetune"), in_memory=False)[0] == "training (as optimised: Inception crops, flips)"


def test_labels_name_what_the_recipe_applied():
    train, val = curve_labels(get_recipe("mnist5k"), in_memory=True)
    assert train == "training (as optimised: rotations, zooms, shifts, elastic warps, label-smoothed loss)"
    assert val == "validation"
    train, val = curve_labels(get_recipe("cifar10-nano"), in_memory=False)
    assert train == ("training (as optimised: padded crops, flips, RandAugment, CutMix on 50% of batches, "
                     "label-smoothed loss)")
    assert val == "validation (EMA weights)"
    assert curve_labels(get_recipe("cifar10-nano", autoaugment="cifar10"), in_memory=False)[0] == \
        "training (as optimised: padded crops, flips, AutoAugment, CutMix on 50% of batches, label-smoothed loss)"
    train, _ = curve_labels(get_recipe("imagenette-s16", dropout=0.1), in_memory=False)
    assert train == ("training (as optimised: Inception crops, flips, RandAugment, MixUp, dropout, stochastic depth, "
                     "label-smoothed loss)")
    # In-memory data are neither cropped, flipped nor mixed; a crop of all the image is no crop.
    assert curve_labels(get_recipe("mnist5k", digits_aug={}, mixup=0.2, label_smoothing=0.0), True)[0] == \
        "training (as optimised)"
    assert curve_labels(get_recipe("finetune", crop_area=(1.0, 1.0), flip=False), False)[0] == "training (as optimised)"


def write_metrics(path: Path, train_loss, val_loss) -> Path:
    """Steps 10…300: a training line every 10 steps, a validation one every 60."""
    rows = []
    for step in range(10, 310, 10):
        rows.append({"step": step, "train_loss": train_loss(step), "train_acc": 0.9})
        if step % 60 == 0:
            rows.append({"step": step, "val_loss": val_loss(step), "val_top1": 0.98})
    path.write_text("".join(json.dumps(m) + "\n" for m in rows))
    return path


@pytest.fixture
def metrics(tmp_path: Path) -> Path:
    """A loss from 2.2 down to 0.2 (as the default job's first 300 steps): a decade and a bit."""
    return write_metrics(tmp_path / "metrics.jsonl", lambda s: 0.65 + 1.9 * 0.98 ** s, lambda s: 0.17 + 10 / s)


def loss_tick_labels(metrics: Path) -> list[str]:
    fig = curves_figure(metrics)
    FigureCanvasAgg(fig).draw()
    return [t.get_text() for minor in (False, True) for t in fig.axes[0].get_yticklabels(minor=minor) if t.get_text()]


def test_log_loss_axis_reads_as_plain_decimals(metrics: Path, tmp_path: Path):
    labels = loss_tick_labels(metrics)
    assert {"0.2", "0.3", "1", "2"} <= set(labels)  # minor ticks labelled too: one decade shows
    assert not [s for s in labels if "$" in s or "e" in s or "×" in s]  # no 2×10⁰ (mathtext) or 2e-01
    # Within a decade matplotlib puts linear ticks (0.36, 0.38, …): each must still read differently.
    narrow = loss_tick_labels(write_metrics(tmp_path / "narrow.jsonl", lambda s: 0.45 - s / 1e4, lambda s: 0.4))
    assert "0.42" in narrow and len(set(narrow)) == len(narrow)


def test_one_legend_below_the_panels(metrics: Path, tmp_path: Path):
    fig = curves_figure(metrics, "training (as optimised: flips)", "validation (EMA weights)")
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    assert [ax.get_legend() for ax in fig.axes] == [None, None]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["training (as optimised: flips)", "validation (EMA weights)"]
    # Below everything each panel draws (curves, ticks, the step label): it can hide nothing.
    assert legend.get_window_extent(renderer).y1 <= min(ax.get_tightbbox(renderer).y0 for ax in fig.axes)
    # ... and still in the picture.
    with Image.open(plot_curves(metrics, tmp_path / "curves.png")) as im:
        assert im.format == "PNG" and im.height > 100 * 4 + 20


def test_a_run_shorter_than_the_logging_interval(tmp_path: Path):
    # `--steps 3 --evals 1`: one training line and one evaluation, both at step 3, losses 0.02 apart.
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 3, "train_loss": 2.3158, "train_acc": 0.107}) + "\n"
                    + json.dumps({"step": 3, "val_loss": 2.2962, "val_top1": 0.08}) + "\n")
    fig = curves_figure(path)
    FigureCanvasAgg(fig).draw()
    # A line through a single point draws nothing: the lone training point needs a marker.
    assert all(line.get_marker() not in ("None", "", None) for ax in fig.axes for line in ax.get_lines())
    # Steps are whole: not 2.96, 3.04 around the one step there is.
    for ax in fig.axes:
        assert "3" in [t.get_text() for t in ax.get_xticklabels()]
        assert all(t.get_text().isdigit() for t in ax.get_xticklabels())
    # Ticks 0.0025 apart: each label is written out in full (2.2975, not a second "2.3").
    labels = loss_tick_labels(path)
    assert "2.2975" in labels and len(set(labels)) == len(labels)


def test_many_evaluations_are_a_line_not_a_band_of_dots(tmp_path: Path):
    rows = [{"step": s, "val_loss": 1 / s, "val_top1": 0.9} for s in range(100, 10_100, 100)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in rows))
    assert {line.get_marker() for ax in curves_figure(path).axes for line in ax.get_lines()} == {"None"}
    # The default five evaluations keep their dots.
    path.write_text("".join(json.dumps(m) + "\n" for m in rows[:5]))
    assert {line.get_marker() for ax in curves_figure(path).axes for line in ax.get_lines()} == {"o"}
