"""Per-class accuracy and the confusion-matrix picture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mlpmixer.reports import confusion_figure, confusion_matrix, confusion_matrix_png, per_class_accuracy, save_figure


def test_per_class_accuracy_and_matrix():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = torch.tensor([0, 1, 0, 1, 1, 0, 2, 2, 1])
    acc = per_class_accuracy(preds, labels, 4)
    np.testing.assert_allclose(acc[:3], [2 / 3, 1.0, 0.5])
    assert np.isnan(acc[3])  # no examples of class 3
    cm = confusion_matrix(preds.numpy(), labels.tolist(), 4)
    assert cm[0].tolist() == [2, 1, 0, 0] and cm[2].tolist() == [1, 1, 2, 0]
    assert cm.sum() == 9
    with pytest.raises(ValueError, match="class indices in 0…3"):
        per_class_accuracy([0, 5], [0, 1], 4)
    with pytest.raises(ValueError, match="one prediction per label"):
        confusion_matrix([0, 1], [0], 4)


@pytest.mark.parametrize("classes", [3, 60])
def test_confusion_matrix_png(tmp_path, classes):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, 500)
    preds = np.where(rng.random(500) < 0.7, labels, rng.integers(0, classes, 500))
    names = [f"class number {i}" for i in range(classes)]
    path = confusion_matrix_png(preds, labels, names, tmp_path / "sub" / "cm.png")
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert 300 <= im.width <= 5000 and 300 <= im.height <= 5000
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["cm.png"]  # no temporary left behind



def test_long_class_names_that_differ_at_the_end_stay_apart():
    names = [f"great_grey_owl_Strix_nebulosa_{i}" for i in range(12)]
    fig = confusion_figure(np.arange(12), np.arange(12), names)
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(set(ticks)) == 12 and max(map(len, ticks)) <= 18
    assert ticks[11].startswith("great_gr") and ticks[11].endswith("bulosa_11")


def test_many_classes_are_indices_on_a_readable_figure():
    labels = np.arange(120).repeat(3)
    fig = confusion_figure(labels, labels, [f"class {i}" for i in range(120)])
    ax = fig.axes[0]
    # No names (they would overlap): the axes say their ticks are the classes' indices.
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class (index)", "true class (index)")
    # A page or a notebook's width, not 25 inches on which 10-point text is a speck.
    assert max(fig.get_size_inches()) <= 12


def test_a_picture_format_matplotlib_lacks_is_one_sentence(tmp_path):
    from matplotlib.figure import Figure

    with pytest.raises(ValueError, match=r"Cannot draw a picture as p\.txt: matplotlib writes no \.txt files"):
        save_figure(Figure(), tmp_path / "p.txt")
    assert not list(tmp_path.iterdir())
    assert save_figure(Figure(), tmp_path / "p.SVG").read_bytes().startswith(b"<?xml")


def test_a_class_without_images_is_grey_not_zero():
    # Class 2 has no images: its row has no rate, unlike a class never predicted right (class 1).
    fig = confusion_figure([0, 0, 2], [0, 1, 1], ["a", "b", "c"])
    ax = fig.axes[0]
    rates = ax.images[0].get_array()
    assert rates[1].tolist() == [0.5, 0.0, 0.5] and np.ma.getmaskarray(rates)[2].all()
    assert ax.get_ylabel() == "true class; grey: no images"
    assert confusion_figure([0, 1], [0, 1], ["a", "b"]).axes[0].get_ylabel() == "true class"


def test_dollar_signs_in_names_and_title_are_plain_text(tmp_path):
    # As mathtext, "x$^$y" was a parse error that stopped `mixer eval --report` after the evaluation.
    path = confusion_matrix_png([0, 1], [0, 1], ["cost_$1$", "x$^$y"], tmp_path / "cm.png", title="on $data$")
    with Image.open(path) as im:
        assert im.format == "PNG"
