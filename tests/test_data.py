"""The in-memory datasets (embedded digits, MNIST IDX folders), hold-out splits and batch augmentation."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from mlpmixer.data import (
    augment_digits, holdout_split, is_idx_folder, load_idx_folder, load_mnist5k, load_tensors, open_source, read_idx,
    to_model_input,
)

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def test_mnist5k_is_5000_balanced_digits() -> None:
    d = load_mnist5k()
    assert d.images.shape == (5000, 1, 28, 28) and d.images.dtype == torch.uint8
    assert d.labels.dtype == torch.int64 and d.labels.min() == 0 and d.labels.max() == 9
    assert torch.bincount(d.labels).tolist() == [500] * 10
    assert d.class_names == [str(i) for i in range(10)]
    assert 0 < d.images.float().mean() < 128 and d.images.max() == 255  # dark background, white strokes


def test_idx_folder_reads_the_mnist_test_set() -> None:
    d = load_idx_folder(MNIST)
    assert d.images.shape == (10000, 1, 28, 28) and d.images.dtype == torch.uint8
    counts = torch.bincount(d.labels, minlength=10)
    assert len(counts) == 10 and counts.sum() == 10000 and counts.min() > 800 and counts.max() < 1200
    assert load_tensors(str(MNIST)) is not None and load_tensors("mnist5k") is not None


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_plain_and_gzip(tmp_path: Path, compress: bool) -> None:
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28))
    labels = np.arange(7) % 10
    suffix = ".gz" if compress else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, compress)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, compress)
    d = load_idx_folder(tmp_path, split="train")
    assert torch.equal(d.images[:, 0], torch.from_numpy(images.astype(np.uint8)))
    assert d.labels.tolist() == labels.tolist()


def test_bad_idx_files(tmp_path: Path) -> None:
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + np.array([5, 28, 28], ">i4").tobytes() + b"\x00" * 100)
    with pytest.raises(ValueError, match=r"truncated: its header promises shape \(5, 28, 28\);"):
        read_idx(tmp_path / "t10k-images-idx3-ubyte")
    assert is_idx_folder(tmp_path)  # images without labels: an IDX folder, whose loading says what is missing
    with pytest.raises(FileNotFoundError, match="no complete pair of MNIST IDX files .* add the missing one"):
        load_idx_folder(tmp_path)
    (tmp_path / "junk-idx1").write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "junk-idx1")
    with pytest.raises(FileNotFoundError, match="no complete pair of MNIST IDX"):
        load_idx_folder(tmp_path / "nowhere")


def test_idx_labels_out_of_range_are_refused_when_loaded(tmp_path: Path) -> None:
    """Not mid-training, where the loss met them (IndexError: Target 200 is out of bounds)."""
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28)), compress=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3, 9, 200, 12]), compress=False)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte holds 2 label\(s\) outside 0-9 \(the first, 200, "
                                         r"at index 2\); fix or re-download"):
        load_tensors(str(tmp_path))


def test_holdout_split_is_seeded_and_disjoint() -> None:
    train, val = holdout_split(100, 10, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    assert torch.equal(holdout_split(100, 10, seed=3)[1], val)
    assert not torch.equal(holdout_split(100, 10, seed=4)[1], val)
    assert len(holdout_split(100, 0.25, seed=0)[1]) == 25
    with pytest.raises(ValueError):
        holdout_split(10, 10, seed=0)


def test_open_source_splits_the_embedded_set() -> None:
    train = open_source("mnist5k", "train", 500, 0, None)
    val = open_source("mnist5k", "val", 500, 0, None)
    assert (train.num_examples, val.num_examples) == (4500, 500)
    x, y = val.dataset[0]
    assert x.shape == (1, 28, 28) and 0 <= y <= 9
    with pytest.raises(FileNotFoundError):
        open_source("/no/such/data", "train", 0.0, 0, None)


def test_to_model_input_converts_channels_size_and_range() -> None:
    grey = torch.tensor([[[[0, 255], [255, 0]]]], dtype=torch.uint8)
    rgb = to_model_input(grey, 2, 3)
    assert rgb.shape == (1, 3, 2, 2) and rgb.min() == -1 and rgb.max() == 1
    back = to_model_input((rgb * 127.5 + 127.5).round().to(torch.uint8), 4, 1)
    assert back.shape == (1, 1, 4, 4) and back.min() >= -1 and back.max() <= 1


def test_augment_digits_identity_and_shift() -> None:
    x = load_mnist5k().images[:8].float() / 127.5 - 1
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(augment_digits(x, g), x, atol=1e-5)  # zero strength: every pixel sampled exactly
    moved = augment_digits(x, g, shift=3)
    assert moved.shape == x.shape and not torch.allclose(moved, x, atol=1e-3)
    assert moved.min() >= -1 - 1e-5 and moved.max() <= 1 + 1e-5

    def centre(img: torch.Tensor) -> torch.Tensor:  # centre of mass of the ink, (row, col)
        w = img[:, 0] + 1
        grid = torch.arange(28.0)
        return torch.stack([(w.sum(2) * grid).sum(1), (w.sum(1) * grid).sum(1)], 1) / w.sum((1, 2))[:, None]

    shift = (centre(moved) - centre(x)).abs()
    assert shift.max() <= 3.5  # never moved further than asked (plus edge effects)
    warped = augment_digits(x, torch.Generator().manual_seed(1), rotate=10, scale=0.1, elastic=2)
    assert (warped - x).abs().mean() > 0.01


def test_augment_digits_share_is_warped_as_in_the_whole_batch() -> None:
    """A training process warps only its share of the batch, with the draws of a one-process run."""
    x = load_mnist5k().images[:8].float() / 127.5 - 1
    strength = dict(rotate=10, scale=0.1, shift=2, elastic=2)
    whole = augment_digits(x, torch.Generator().manual_seed(3), **strength)
    rows = torch.tensor([5, 1, 6])
    share = augment_digits(x, torch.Generator().manual_seed(3), rows=rows, **strength)
    assert torch.equal(share, whole[rows])
