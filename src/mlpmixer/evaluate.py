"""Top-1 / top-5 accuracy of a model on any `--data`."""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .cli import raise_if_stopped
from .data import MNIST5K, Source, TensorData, load_tensors, to_model_input
from .model import MlpMixer


def tensor_batches(data: TensorData, model: MlpMixer, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """In-memory data as model-ready batches (channels and size converted to the model's)."""
    cfg = model.config
    for i in range(0, len(data), batch_size):
        yield to_model_input(data.images[i:i + batch_size], cfg.img_size, cfg.in_chans), data.labels[i:i + batch_size]


def open_eval_data(spec: str, model: MlpMixer, mode: str = "resize", workers: int = 2) -> Union[TensorData, Source]:
    """`spec` (mnist5k, an IDX folder, an image folder or shards) as evaluation data for `model`.

    In-memory sets are used whole (for an IDX folder, its test files); folders and shards whole too.
    `mode` (resize | resmall-crop, SPEC §4) is the preprocessing of folders and shards; in-memory
    digits are always resized bilinearly to the model's size (data.to_model_input), whatever the mode:
    asked for another mode, they say so in a warning (`applied_eval_mode` gives the mode that runs).
    """
    data = load_tensors(spec, split="test")
    if data is not None:
        if applied_eval_mode(data, mode) != mode:  # a report naming the mode asked for would name one that never ran
            warnings.warn(f"Eval mode {mode} does not apply to {spec}: digits held in memory are always resized to "
                          "the model's size, so the result is for resize.", stacklevel=2)
        return data
    from .sources import open_folder_or_shards
    from .transforms import eval_transform

    cfg = model.config
    return open_folder_or_shards(spec, "val", 0.0, 0, eval_transform(cfg.img_size, cfg.in_chans, mode))


def open_run_validation(recipe: dict[str, Any], model: MlpMixer, mode: str = "resize",
                        workers: int = 2) -> tuple[Union[TensorData, Source], str, str]:
    """The images a `mixer train` run validated on, from the recipe its config.json records, for `model`; the data
    they are part of; and which part, in words: its --eval-data, the val/ part of a train/ + val/ folder, or the
    images it held out of --data (the same ones: the hold-out is a function of the seed and the data, train.py's
    and this alike)."""
    from .data import holdout_split
    from .sources import holdout_share, is_split_pair, open_folder_or_shards
    from .transforms import eval_transform

    data, eval_data = recipe.get("data"), recipe.get("eval_data")
    holdout, seed = recipe.get("holdout") or 0, recipe.get("seed") or 0
    path = eval_data or data  # the one opened below, recorded as given: relative to where the run was started
    if path and path != MNIST5K and not os.path.isabs(path) and not any(c in path for c in "*?[{") \
            and not os.path.exists(path):
        raise FileNotFoundError(f"The run's data {path} is not here: its config.json records the path as it was "
                                "given, relative to the folder the run was started in; run from there or give "
                                "--data.")
    if eval_data:
        return open_eval_data(eval_data, model, mode, workers), eval_data, f"the run's --eval-data {eval_data}"
    if not data:
        raise ValueError("The run records no training data to find its validation images in; give --data.")
    if is_split_pair(data):
        return open_eval_data(data, model, mode, workers), data, f"the val/ part of {data}"
    if not holdout:
        raise ValueError(f"The run held out none of {data} and had no --eval-data: it validated on nothing; give "
                         "--data.")
    tensors = load_tensors(data, split="train")
    held_out = f"the images the run held out of {data}"
    if tensors is not None:
        return tensors.subset(holdout_split(len(tensors), holdout, seed)[1]), data, held_out
    cfg = model.config
    source = open_folder_or_shards(data, "val", holdout_share(data, holdout, seed), seed,
                                   eval_transform(cfg.img_size, cfg.in_chans, mode))
    return source, data, held_out


def applied_eval_mode(data: Union[TensorData, Source], mode: str) -> str:
    """The preprocessing that evaluating `data` opened with `open_eval_data(..., mode)` applies: `mode` for
    folders and shards, "resize" for in-memory digits, whatever `mode` asked."""
    return "resize" if isinstance(data, TensorData) else mode


def batches_of(data: Union[TensorData, Source], model: MlpMixer, batch_size: int, workers: int = 2) -> Iterable:
    """(images, labels) batches of `data` for `model`, without the images that could not be decoded."""
    if isinstance(data, TensorData):
        return tensor_batches(data, model, batch_size)
    from .sources import drop_bad

    loader = torch.utils.data.DataLoader(data.dataset, batch_size=batch_size, num_workers=workers, collate_fn=drop_bad)
    return (batch for batch in loader if batch is not None)


def check_classes(model: MlpMixer, names: list[str], name: str) -> None:
    """ValueError unless data of classes `names` (named `name` in the message) have the model's classes:
    a label beyond the head stops cross-entropy with torch's bare IndexError, and fewer classes (or others)
    give numbers that mean nothing."""
    from .sources import check_same_classes

    if len(names) != model.num_classes:
        raise ValueError(f"{name} has {len(names)} classes but the model predicts {model.num_classes}; "
                         "evaluate on data with the model's classes.")
    if model.class_names:  # names the first class that differs: lists of the first few read alike past them
        check_same_classes(model.class_names, names, name, "the model")


@torch.no_grad()
def evaluate(
    model: MlpMixer,
    data: Union[TensorData, Source, str, os.PathLike],
    batch_size: int = 500,
    workers: int = 2,
    progress: bool = False,
    device: Optional[torch.device] = None,
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    predictions: bool = False,
    name: Optional[str] = None,
) -> dict[str, Any]:
    """{"top1", "top5" (fractions; top5 None for 5 classes or fewer), "loss" (mean softmax cross-entropy), "n"}
    of `model` on `data`
    (opened data, or a `--data` spec such as a path, opened with `open_eval_data`'s "resize" default).

    `transform` is applied to every model-ready batch (e.g. the fixed permutation of permute.py).
    With `predictions`, the result also holds "preds" and "labels": the top-1 class and the true class
    of every image, in data order (int64 tensors on the CPU), for reports.per_class_accuracy and friends.
    Data with other classes than the model's (their number, or the names where the model has some) are a
    ValueError naming them as `name` (default: the spec, or "the data").
    """
    if model.num_classes == 0:
        raise ValueError(f"Evaluation needs a classifier head, and this {model.config.describe()} has none "
                         "(num_classes=0): give it one with model.reset_classifier(N) and train it, or measure its "
                         "features with mlpmixer.fewshot (`mixer fewshot`, `mixer linear-probe`).")
    if isinstance(data, (str, os.PathLike)):
        name = name or str(data)
        data = open_eval_data(str(data), model, workers=workers)
    check_classes(model, data.class_names, name or "the data")
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    k = min(5, model.num_classes)
    correct1 = correct5 = n = 0
    loss_sum = 0.0
    preds: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    total = len(data) if isinstance(data, TensorData) else data.num_examples
    # Closed on an error too: its line is cleared before the error is printed.
    with tqdm(total=total, desc="evaluating", unit="img", disable=None if progress else True,
              leave=False) as bar:
        for x, y in batches_of(data, model, batch_size, workers):
            raise_if_stopped()  # a Ctrl-C or SIGTERM whose exception a finaliser swallowed
            x, y = x.to(device), y.to(device)
            if transform is not None:
                x = transform(x)
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            top = logits.topk(k, dim=1).indices
            correct1 += (top[:, 0] == y).sum().item()
            correct5 += (top == y[:, None]).any(dim=1).sum().item()
            n += len(y)
            if predictions:
                preds.append(top[:, 0].cpu())
                labels.append(y.cpu())
            bar.update(len(y))
    model.train(was_training)
    if n == 0:
        raise ValueError("The evaluation data holds no images; check the path.")
    # With 5 classes or fewer every class is among the top 5: its accuracy would be 100% and say nothing.
    top5 = correct5 / n if model.num_classes > 5 else None
    result = {"top1": correct1 / n, "top5": top5, "loss": loss_sum / n, "n": n}
    if predictions:
        result.update(preds=torch.cat(preds), labels=torch.cat(labels))
    return result
