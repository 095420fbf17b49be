"""Image folders and WebDataset shards: classes, counts, hold-out, worker and rank splitting, bad images,
bad paths, and one real CIFAR-10 shard."""

from __future__ import annotations

import gc
import io
import itertools
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from mlpmixer import sources
from mlpmixer.sources import (
    BadDataError,
    check_same_classes,
    decode_image_bytes,
    in_holdout,
    open_folder_or_shards,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def encode(index: int, fmt: str = "PNG", mode: str = "RGB", size: int = 8) -> bytes:
    """A small image whose first two channels spell `index`, so tests can tell samples apart."""
    image = Image.new("RGB", (size, size), (index % 256, index // 256, 7)).convert(mode)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def sample_id(image: torch.Tensor) -> int:
    return int(image[0, 0, 0]) + 256 * int(image[1, 0, 0])


def truncated(index: int) -> bytes:
    return encode(index)[:40]


def make_folder(root: Path, counts: dict[str, int], bad: tuple[int, ...] = (), start: int = 0) -> list[int]:
    """Class sub-folders of PNG images numbered from `start`; returns the labels in number order."""
    labels, index = [], start
    for label, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for _ in range(count):
            data = truncated(index) if index in bad else encode(index)
            (root / name / f"{index:04d}.png").write_bytes(data)
            labels.append(label)
            index += 1
    return labels


def make_shards(
    folder: Path, shards: int, per_shard: int, suffix: str = ".tar", bad: tuple[int, ...] = (), classes: int = 3,
    describe: bool = True,
) -> None:
    """Shards of PNG samples 0..shards*per_shard-1 with label index % classes, and a dataset.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"part-{s:03d}{suffix}")) as sink:
            for i in range(s * per_shard, (s + 1) * per_shard):
                data = truncated(i) if i in bad else encode(i)
                sink.write({"__key__": f"sample{i:05d}", "png": data, "cls": str(i % classes).encode()})
    if describe:
        info = {"classes": [f"class{c}" for c in range(classes)], "splits": {"train": shards * per_shard}}
        (folder / "dataset.json").write_text(json.dumps(info))


def ids_and_labels(dataset, workers: int = 0) -> list[tuple[int, int]]:
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    return [(sample_id(item[0]), int(item[1])) for item in loader if item is not None]  # None: a skipped image


# --- image folders -------------------------------------------------------------------------------------


def test_image_folder_classes_counts_and_samples(tmp_path: Path) -> None:
    labels = make_folder(tmp_path, {"cat": 3, "dog": 2})
    source = open_folder_or_shards(str(tmp_path), "train", 0.0, 0, None)
    assert source.class_names == ["cat", "dog"]
    assert source.num_examples == len(source.dataset) == 5
    got = sorted(ids_and_labels(source.dataset))
    assert got == list(enumerate(labels))
    image, _ = source.dataset[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path: Path) -> None:
    labels = make_folder(tmp_path, {"cat": 3, "dog": 2})
    (tmp_path / ".ipynb_checkpoints").mkdir()  # Jupyter's, in any folder it opened
    (tmp_path / "cat" / "._0000.png").write_bytes(b"\x00\x05\x16\x07 macOS metadata, not an image")
    (tmp_path / "dog" / ".ipynb_checkpoints").mkdir()  # inside a class too: its copies were read as images
    (tmp_path / "dog" / ".ipynb_checkpoints" / "0003-checkpoint.png").write_bytes(encode(3))
    source = open_folder_or_shards(str(tmp_path), "train", 0.0, 0, None)
    assert source.class_names == ["cat", "dog"] and source.num_examples == 5
    assert sorted(ids_and_labels(source.dataset)) == list(enumerate(labels))
    assert source.dataset.bad_samples.bad == 0
    only_hidden = tmp_path / "only-hidden"
    (only_hidden / ".cache").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has neither class sub-folders nor"):
        open_folder_or_shards(str(only_hidden), "train", 0.0, 0, None)


def test_a_named_pipe_is_a_bad_sample_not_a_hang(tmp_path: Path) -> None:
    """A pipe named like an image blocked the reader for ever; it is skipped and counted, as a broken file is."""
    make_folder(tmp_path, {"cat": 3, "dog": 2})
    os.mkfifo(tmp_path / "dog" / "pipe.png")
    source = open_folder_or_shards(str(tmp_path), "train", 0.0, 0, None)
    pipe = next(i for i, (path, _) in enumerate(source.dataset.samples) if path.endswith("pipe.png"))
    with pytest.warns(UserWarning, match=r"Skipping .*pipe\.png: not a regular file \(a pipe, socket or device\)"):
        assert source.dataset[pipe] is None
    assert source.dataset.bad_samples.bad == 1


def test_links_are_followed_unless_they_lead_back_into_the_data(tmp_path: Path) -> None:
    """`ln -s .. a/up` made 2,460 samples of 60 images, most of them under the wrong class."""
    data = tmp_path / "data"
    make_folder(data, {"a": 3, "b": 2})
    make_folder(tmp_path / "elsewhere", {"c": 2, "more": 1}, start=10)
    (data / "a" / "up").symlink_to("..")  # a loop
    (data / "a" / "b-too").symlink_to(data / "b")  # b's images under a
    (data / "c").symlink_to(tmp_path / "elsewhere" / "c")  # a class folder kept elsewhere: followed
    (data / "b" / "more").symlink_to(tmp_path / "elsewhere" / "more")  # a folder of b's kept elsewhere: followed
    (tmp_path / "elsewhere" / "more" / "again").symlink_to(tmp_path / "elsewhere" / "more")  # a loop there
    (data / "b" / "one.png").symlink_to(tmp_path / "elsewhere" / "c" / "0010.png")  # an image: followed
    with pytest.warns(UserWarning) as said:
        source = open_folder_or_shards(str(data), "train", 0.0, 0, None)
    assert source.class_names == ["a", "b", "c"]
    assert sorted(ids_and_labels(source.dataset)) == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (10, 1), (10, 2),
                                                      (11, 2), (12, 1)]
    skipped = sorted(str(w.message).split()[4].rstrip(":") for w in said)
    assert skipped == [str(data / "a" / "b-too"), str(data / "a" / "up"), str(data / "b" / "more" / "again")]


def test_a_class_folder_without_images_stops_training_and_is_warned_about_elsewhere(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 2, "b": 0, "c": 1})
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"The class folder .*b holds no images; put its images in it or "
                                                r"remove it \(a class that no image shows cannot be learnt\)\."):
        open_folder_or_shards(str(tmp_path), "train", 0.0, 0, None)
    with pytest.warns(UserWarning, match=r"The class folder .*b holds no images: its class has nothing to evaluate"):
        source = open_folder_or_shards(str(tmp_path), "val", 0.0, 0, None)
    assert source.class_names == ["a", "b", "c"] and source.num_examples == 3


def test_a_folder_that_cannot_be_read_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """os.walk passed over it, so its class had no images, or fewer, without a word."""
    make_folder(tmp_path, {"a": 2, "b": 1})
    (tmp_path / "a" / "more").mkdir()
    real_scandir = os.scandir

    def scandir(path):  # as for a folder of mode 000, which the tests' root user could read anyway
        if Path(path) == tmp_path / "a" / "more":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    for split in ("train", "val"):
        with pytest.raises(OSError, match=r"^\S+/a/more cannot be read \(Permission denied\); fix its permissions"):
            open_folder_or_shards(str(tmp_path), split, 0.0, 0, None)


def test_train_val_pair_picks_the_split(tmp_path: Path) -> None:
    make_folder(tmp_path / "train", {"a": 4, "b": 4})
    make_folder(tmp_path / "val", {"a": 1, "b": 2}, start=100)
    train = open_folder_or_shards(str(tmp_path), "train", 0.5, 0, None)  # a val/ folder wins over a hold-out
    val = open_folder_or_shards(str(tmp_path), "val", 0.5, 0, None)
    assert (train.num_examples, val.num_examples) == (8, 3)
    assert train.class_names == val.class_names == ["a", "b"]
    assert sorted(i for i, _ in ids_and_labels(val.dataset)) == [100, 101, 102]


@pytest.mark.parametrize("other", ["test", "valid", "validation"])
def test_train_beside_another_split_name_is_warned_of_once(tmp_path: Path, other: str) -> None:
    """Only train/ + val/ are the splits; train/ + test/ were read as two classes without a word."""
    make_folder(tmp_path / "train", {"a": 4, "b": 4})
    make_folder(tmp_path / other, {"a": 1, "b": 2}, start=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for split in ("train", "val"):  # a hold-out opens the folder for each side
            source = open_folder_or_shards(str(tmp_path), split, 0.5, 0, None)
    assert sorted(source.class_names) == sorted(["train", other])
    assert [str(w.message) for w in caught] == [
        f"{tmp_path} has train/ and {other}/ sub-folders but no val/, so they are read as classes named \"train\" "
        f"and \"{other}\"; rename {other}/ to val/ to train on train/ and validate on it."]


def test_folder_holdout_is_disjoint_complete_and_seeded(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 30, "b": 30})

    def ids(split: str, seed: int) -> set[int]:
        return {i for i, _ in ids_and_labels(open_folder_or_shards(str(tmp_path), split, 0.25, seed, None).dataset)}

    train, val = ids("train", 1), ids("val", 1)
    assert not train & val and train | val == set(range(60))
    assert len(val) == 15  # exactly a quarter
    assert ids("val", 1) == val  # deterministic
    assert ids("val", 2) != val  # and seeded
    assert open_folder_or_shards(str(tmp_path), "val", 0.0, 1, None).num_examples == 60  # no hold-out: whole folder
    assert open_folder_or_shards(str(tmp_path), "val", 1 / 60, 1, None).num_examples == 1  # a count of 1 is 1
    with pytest.raises(ValueError, match="Holding out 0 of the 60 images .* leaves its val part empty"):
        open_folder_or_shards(str(tmp_path), "val", 0.001, 1, None)


def test_folder_bad_image_is_skipped_and_counted(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 150, "b": 150}, bad=(5,))
    dataset = open_folder_or_shards(str(tmp_path), "val", 0.0, 0, None).dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = [i for i, _ in ids_and_labels(dataset, workers=2)]
    assert sorted(ids) == [i for i in range(300) if i != 5]  # skipped: evaluation counts each good image once
    assert (dataset.bad_samples.bad, dataset.bad_samples.seen) == (1, 300)  # the workers' counts reach us
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert len(ids_and_labels(dataset)) == 299  # a second epoch passes over the file found bad
    assert not [w for w in said if "Skipping" in str(w.message)]  # without a word
    assert (dataset.bad_samples.bad, dataset.bad_samples.seen) == (1, 599)  # counted once, not per epoch
    # Training keeps its batches whole: the next good image stands in.
    training = open_folder_or_shards(str(tmp_path), "train", 0.0, 0, None, replace_bad=True).dataset
    with pytest.warns(UserWarning, match="0005.png"):
        image, label = training[5]
    assert sample_id(image) == 6 and label == 0
    assert (training.bad_samples.bad, training.bad_samples.seen) == (1, 2)


def test_an_empty_image_file_is_skipped_as_an_empty_file(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 2})
    (tmp_path / "a" / "zero.png").write_bytes(b"")
    dataset = open_folder_or_shards(str(tmp_path), "val", 0.0, 0, None).dataset
    with pytest.warns(UserWarning, match=r"Skipping .*zero.png: empty file\.$"):
        assert dataset[2] is None


def test_a_file_name_that_is_not_utf8_is_held_out_by_its_bytes(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 5, "b": 5})
    odd = os.path.join(os.fsencode(tmp_path / "a"), b"caf\xe9.png")  # Latin-1, as older file systems write
    with open(odd, "wb") as f:
        f.write(encode(99))
    train = open_folder_or_shards(str(tmp_path), "train", 0.3, 0, None)
    val = open_folder_or_shards(str(tmp_path), "val", 0.3, 0, None)
    got = ids_and_labels(train.dataset) + ids_and_labels(val.dataset)
    assert sorted(got) == [*[(i, i // 5) for i in range(10)], (99, 0)] and val.num_examples == 3


def test_folder_with_too_many_bad_images_stops(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 10, "b": 10}, bad=(3, 12))
    dataset = open_folder_or_shards(str(tmp_path), "train", 0.0, 0, None).dataset
    with warnings.catch_warnings(), pytest.raises(BadDataError, match="2 of 2[01] images"):
        warnings.simplefilter("ignore")
        ids_and_labels(dataset)


def test_too_many_bad_images_are_said_of_the_data_that_holds_them(tmp_path: Path) -> None:
    # Training and evaluation data (or a hold-out's two sides) warn on one terminal: "4 of 14" was neither's.
    make_folder(tmp_path / "folder", {"a": 10, "b": 10}, bad=tuple(range(20)))
    make_shards(tmp_path / "shards", shards=1, per_shard=10, bad=tuple(range(10)))
    cases = [(tmp_path / "folder", "train", 0.0, f"of {tmp_path / 'folder'} could"),
             (tmp_path / "folder", "train", 0.5, f"of the training part of {tmp_path / 'folder'} could"),
             (tmp_path / "shards", "val", 0.5, f"of the hold-out of {tmp_path / 'shards'} could")]
    for path, split, holdout, words in cases:
        dataset = open_folder_or_shards(str(path), split, holdout, 0, None).dataset
        with warnings.catch_warnings(), pytest.raises(BadDataError, match=r"\(100\.0%\) " + re.escape(words)):
            warnings.simplefilter("ignore")
            ids_and_labels(dataset)


# --- WebDataset shards ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_shards_classes_counts_and_samples(tmp_path: Path, suffix: str) -> None:
    make_shards(tmp_path, shards=3, per_shard=5, suffix=suffix)
    source = open_folder_or_shards(str(tmp_path), "val", 0.0, 0, None)
    assert source.class_names == ["class0", "class1", "class2"]
    assert source.num_examples == 15
    assert ids_and_labels(source.dataset) == [(i, i % 3) for i in range(15)]  # val keeps the order


def test_shards_each_sample_once_per_epoch_with_workers(tmp_path: Path) -> None:
    make_shards(tmp_path, shards=4, per_shard=6)
    dataset = open_folder_or_shards(str(tmp_path), "train", 0.0, 0, None).dataset
    first = ids_and_labels(dataset, workers=2)
    assert sorted(first) == [(i, i % 3) for i in range(24)]
    assert ids_and_labels(dataset, workers=2) == first  # same epoch, same order
    dataset.set_epoch(1)
    second = ids_and_labels(dataset, workers=2)
    assert sorted(second) == sorted(first) and second != first  # a new epoch is shuffled anew


def test_shards_split_across_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_shards(tmp_path, shards=6, per_shard=2)
    dataset = open_folder_or_shards(str(tmp_path), "train", 0.0, 0, None).dataset
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; torch.distributed is read otherwise
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        per_rank.append({i for i, _ in ids_and_labels(dataset, workers=2)})
    assert not per_rank[0] & per_rank[1] and per_rank[0] | per_rank[1] == set(range(12))
    assert len(per_rank[0]) == len(per_rank[1]) == 6  # three shards each, whatever the workers


@pytest.mark.parametrize("world_size, workers", [(1, 3), (2, 2), (7, 1)])
def test_fewer_shards_than_readers_split_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, world_size: int, workers: int
) -> None:
    """CIFAR-10's 5 shards and 16 workers: every reader gets a share, each sample is read once."""
    make_shards(tmp_path, shards=2, per_shard=7)
    dataset = open_folder_or_shards(str(tmp_path), "train", 0.0, 0, None).dataset
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    per_rank = []
    for rank in range(world_size):
        monkeypatch.setenv("RANK", str(rank))
        per_rank.append([i for i, _ in ids_and_labels(dataset, workers=workers)])
    everything = [i for ids in per_rank for i in ids]
    assert sorted(everything) == list(range(14))  # disjoint and complete
    assert all(ids for ids in per_rank)  # no rank is left without samples


@pytest.mark.parametrize("shards", [1, 4])
def test_validation_shards_are_read_whole_by_any_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      shards: int) -> None:
    """Only rank 0 evaluates: in 2 processes it scored half of a hold-out of 4 shards, and none of one shard's
    ("The evaluation data holds no images")."""
    make_shards(tmp_path, shards=shards, per_shard=40 // shards)
    val = open_folder_or_shards(str(tmp_path), "val", 0.2, 3, None)
    alone = sorted(ids_and_labels(val.dataset))
    assert len(alone) == val.num_examples > 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        assert sorted(ids_and_labels(val.dataset)) == alone


def test_a_holdout_of_numbered_names_does_not_follow_their_digits() -> None:
    held = [i for i in range(2000) if in_holdout(f"sample{i:05d}", 0.1, 0)]
    # About 200, about 20 for each last digit (CRC-32 held out none ending in 0, 4 or 8, and 3 odd for 1 even).
    assert 170 < len(held) < 230
    assert all(8 < sum(i % 10 == d for i in held) < 35 for d in range(10))
    assert 0.4 < sum(i % 2 for i in held) / len(held) < 0.6


def test_shard_holdout_is_disjoint_complete_and_deterministic(tmp_path: Path) -> None:
    make_shards(tmp_path, shards=2, per_shard=40, suffix=".tar.gz")

    def ids(split: str) -> list[int]:
        source = open_folder_or_shards(str(tmp_path), split, 0.2, 3, None)
        got = sorted(i for i, _ in ids_and_labels(source.dataset))
        assert source.num_examples == len(got)  # counted, not estimated: training needs the epoch's end
        return got

    train, val = ids("train"), ids("val")
    assert not set(train) & set(val) and sorted(train + val) == list(range(80))
    assert 5 <= len(val) <= 30
    assert ids("val") == val
    with pytest.raises(ValueError, match="leaves their val part empty"):  # said before any training
        open_folder_or_shards(str(tmp_path), "val", 1e-6, 3, None)


def test_an_empty_holdout_from_a_count_names_dataset_json_count(tmp_path: Path, capsys) -> None:
    """--holdout 20 is a share of what dataset.json counts: one copied from elsewhere (50,000 images beside 40) made
    it 0.0004, reported back unexplained; the sentence now names the count it was taken from."""
    from mlpmixer.cli import main

    make_shards(tmp_path, shards=2, per_shard=20, suffix=".tar.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({"classes": ["a", "b", "c"], "splits": {"train": 50000}}))
    assert main(["train", "--data", str(tmp_path), "--holdout", "20", "--steps", "1", "--quiet",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert (f"leaves their val part empty ({tmp_path / 'dataset.json'} counts 50000 images; a --holdout count is "
            "taken as a share of that, so check that it counts these shards); hold out more or fewer") in err


def test_globs_brace_lists_and_single_shards(tmp_path: Path) -> None:
    make_shards(tmp_path, shards=3, per_shard=2, suffix=".tar.gz")
    for spec, count in [
        (tmp_path / "part-00[01].tar.gz", 4),
        (tmp_path / "part-{000..002}.tar.gz", 6),
        (tmp_path / "part-002.tar.gz", 2),
    ]:
        source = open_folder_or_shards(str(spec), "train", 0.0, 0, None)
        assert len(ids_and_labels(source.dataset)) == source.num_examples == count
        assert source.class_names == ["class0", "class1", "class2"]


def test_shards_without_dataset_json_count_their_classes(tmp_path: Path) -> None:
    make_shards(tmp_path, shards=2, per_shard=4, classes=5, describe=False)
    with pytest.warns(UserWarning, match="dataset.json"):
        source = open_folder_or_shards(str(tmp_path), "train", 0.0, 0, None)
    assert source.class_names == ["0", "1", "2", "3", "4"] and source.num_examples == 8



def test_shards_without_dataset_json_are_said_so_once(tmp_path: Path) -> None:
    """Training with a hold-out opens both sides (and counts the images for a --holdout count): it was said
    on each."""
    make_shards(tmp_path, shards=2, per_shard=4, describe=False)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for split, holdout in (("train", 0.0), ("train", 0.5), ("val", 0.5)):
            open_folder_or_shards(str(tmp_path), split, holdout, 0, None)
    assert len([w for w in said if "No dataset.json" in str(w.message)]) == 1


def test_shards_holding_more_than_dataset_json_counts_are_said_so_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    """The count ends training's epochs: the images beyond it were left out of every epoch without a word."""
    make_shards(tmp_path, shards=2, per_shard=5)  # 10 images, counted right
    # DataLoader workers, forked, inherit this: their warnings reach our stderr, whatever the registry says.
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args, **kwargs: print(message, file=sys.stderr))
    warnings.simplefilter("always")  # (pytest restores the filters after the test)

    def said(workers: int, path: Path = tmp_path, images: int = 10) -> list[str]:
        """What two passes over `path` say of its count."""
        dataset = open_folder_or_shards(str(path), "train", 0.0, 0, None).dataset
        for _ in range(2):
            assert len(ids_and_labels(dataset, workers)) == images  # nothing is cut short
        return [line for line in capfd.readouterr().err.splitlines() if "hold more" in line]

    assert said(0) == said(2) == []  # pass after pass, no false alarm
    info = json.loads((tmp_path / "dataset.json").read_text())
    (tmp_path / "dataset.json").write_text(json.dumps({**info, "splits": {"train": 6}}))
    expected = (f"{tmp_path / 'dataset.json'} counts 6 images, but the shards hold more (at least 7): training "
                "ends each epoch after the count, leaving the others out; correct the count in its \"splits\" (or "
                "remove it and train with --steps).")
    assert said(0) == said(2) == [expected]  # once, whichever reader finds it
    assert said(2, tmp_path / "part-000.tar", images=5) == [
        f"{tmp_path / 'dataset.json'} counts 6 images, 3 in proportion for the 1 of its 2 shards read, but the "
        "shards hold more (at least 4): training ends each epoch after the count, leaving the others out; correct "
        "the count in its \"splits\" (or remove it and train with --steps)."]

@pytest.mark.parametrize("info, complaint", [
    ({"classes": "abc", "splits": {"train": 6}}, "\"classes\" must be a list of names, not 'abc'"),
    ({"classes": [], "splits": {"train": 6}}, "\"classes\" is empty: name the classes"),
    ({"classes": ["crane", "dog", "crane"]}, "\"classes\" names 'crane' more than once: give each class its own name"),
    ({"classes": ["a", "b", "c"], "splits": {"train": "6"}}, "\"splits\" must map each split to a whole number"),
    ({"classes": ["a", "b", "c"], "splits": [6]}, "\"splits\" must map each split to a whole number"),
])
def test_a_dataset_json_of_the_wrong_shape_is_one_sentence(tmp_path: Path, info: dict, complaint: str) -> None:
    """A string of classes was read as one-letter classes, a quoted count gave a TypeError."""
    make_shards(tmp_path, shards=1, per_shard=6)
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=f"dataset.json is not a valid dataset description \\({complaint}.*\\); "
                                         "fix it or remove it"):
        open_folder_or_shards(str(tmp_path), "train", 0.0, 0, None)


def test_shard_bad_image_is_skipped_and_counted(tmp_path: Path) -> None:
    make_shards(tmp_path, shards=2, per_shard=75, bad=(10,))
    dataset = open_folder_or_shards(str(tmp_path), "train", 0.0, 0, None).dataset
    with pytest.warns(UserWarning, match="sample00010"):
        ids = [i for i, _ in ids_and_labels(dataset)]
    assert sorted(ids) == [i for i in range(150) if i != 10]
    assert (dataset.bad_samples.bad, dataset.bad_samples.seen) == (1, 150)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the workers warn on their own stderr)
        ids = [i for i, _ in ids_and_labels(dataset, workers=2)]
    assert sorted(ids) == [i for i in range(150) if i != 10]
    # Found bad in the first pass: passed over in the workers, not counted again (as folders do).
    assert (dataset.bad_samples.bad, dataset.bad_samples.seen) == (1, 299)
    for epoch in range(1, 4):  # counted on each pass, 2 of 151 (1.3%) stopped a run where it came first
        dataset.set_epoch(epoch)
        assert len(ids_and_labels(dataset, workers=2)) == 149
    assert (dataset.bad_samples.bad, dataset.bad_samples.seen) == (1, 150 + 4 * 149)


def test_shard_bad_images_are_counted_once_when_an_epoch_ends_before_its_pass(tmp_path: Path) -> None:
    # An epoch of whole batches reads a little less than its pass, so the bad fraction is first judged early in
    # the next pass: a bad image not remembered from the first was counted twice (3 bad of 100 as "4 of 100").
    make_shards(tmp_path, shards=1, per_shard=100, bad=(0, 1, 2))
    dataset = open_folder_or_shards(str(tmp_path), "val", 0.0, 0, None).dataset  # "val": read in shard order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(list(itertools.islice(dataset, 90))) == 90  # the epoch ends here, its pass abandoned
        dataset.set_epoch(1)
        with pytest.raises(BadDataError, match=r"^3 of 100 images \(3\.0%\) of .* could not be decoded"):
            list(dataset)
    assert dataset.bad_samples.bad == 3


def write_odd_samples(shard: Path) -> None:
    """A shard of four samples without an image or a usable label."""
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "no_image", "cls": b"1"})
        sink.write({"__key__": "bad_class", "png": encode(0), "cls": b"7"})
        sink.write({"__key__": "no_class", "png": encode(0)})
        sink.write({"__key__": "text_class", "png": encode(0), "cls": b"abc"})


def test_shard_samples_without_image_or_valid_class_are_bad(tmp_path: Path) -> None:
    make_shards(tmp_path, shards=1, per_shard=500)
    write_odd_samples(tmp_path / "part-001.tar")
    dataset = open_folder_or_shards(str(tmp_path), "val", 0.0, 0, None).dataset
    with pytest.warns(UserWarning) as caught:
        assert len(ids_and_labels(dataset)) == 500
    assert (dataset.bad_samples.bad, dataset.bad_samples.seen) == (4, 504)
    messages = " ".join(str(w.message) for w in caught)
    for said in ("part-001.tar:no_image: no jpg/jpeg/png/webp image",
                 "part-001.tar:bad_class: its .cls label 7 is not one of the 3 classes",
                 "part-001.tar:no_class: it has no .cls label",
                 "part-001.tar:text_class: its .cls label 'abc' is not a class number"):
        assert said in messages


def test_shards_scanned_for_counts_leave_out_samples_without_a_usable_label(tmp_path: Path) -> None:
    """Scanned for a hold-out or for the classes, a sample without .cls (KeyError: 'cls') or with a .cls that
    is no number (invalid literal for int()) stopped the run naming neither; it is now a bad sample."""
    make_shards(tmp_path, shards=1, per_shard=500, describe=False)
    with wds.TarWriter(str(tmp_path / "part-001.tar")) as sink:
        sink.write({"__key__": "no_class", "png": encode(0)})
        sink.write({"__key__": "text_class", "png": encode(0), "cls": b"abc"})
    with pytest.warns(UserWarning, match="No dataset.json"):
        train = open_folder_or_shards(str(tmp_path), "train", 0.5, 0, None)
        val = open_folder_or_shards(str(tmp_path), "val", 0.5, 0, None)
    assert train.class_names == ["0", "1", "2"]
    with pytest.warns(UserWarning, match="no_class: it has no .cls label|text_class: its .cls label 'abc'"):
        got = [ids_and_labels(side.dataset) for side in (train, val)]
    # The counts hold the samples read: an epoch ends where the data does.
    assert [len(ids) for ids in got] == [train.num_examples, val.num_examples]
    assert train.num_examples + val.num_examples == 500


def test_shards_without_dataset_json_need_labels_without_gaps(tmp_path: Path) -> None:
    """One sample labelled 99 among 0-9 made a model of 100 classes."""
    make_shards(tmp_path, shards=1, per_shard=20, classes=10, describe=False)
    with wds.TarWriter(str(tmp_path / "part-001.tar")) as sink:
        sink.write({"__key__": "odd", "png": encode(0), "cls": b"99"})
    with pytest.warns(UserWarning, match="No dataset.json"), pytest.raises(
            ValueError, match=r"The .cls labels of the shards in .* skip 10 to 98 \(.*part-001.tar:odd is labelled "
                              r"99\); put a dataset.json naming the classes next to them"):
        open_folder_or_shards(str(tmp_path), "train", 0.0, 0, None)
    make_shards(tmp_path / "labels", shards=1, per_shard=12, classes=4, describe=False)
    with wds.TarWriter(str(tmp_path / "labels" / "part-000.tar")) as sink:  # replaced: no label 2
        for i in range(12):
            sink.write({"__key__": f"s{i}", "png": encode(i), "cls": str([0, 1, 3][i % 3]).encode()})
    with pytest.warns(UserWarning, match="No dataset.json"), pytest.raises(ValueError, match=r"skip 2 \(.*:s2 is"):
        open_folder_or_shards(str(tmp_path / "labels"), "val", 0.0, 0, None)
    (tmp_path / "none").mkdir()
    with wds.TarWriter(str(tmp_path / "none" / "part-000.tar")) as sink:
        sink.write({"__key__": "s0", "png": encode(0)})
    with pytest.warns(UserWarning, match="No dataset.json"), pytest.raises(ValueError, match="No sample of the shards"):
        open_folder_or_shards(str(tmp_path / "none"), "val", 0.0, 0, None)


def test_too_many_bad_labels_are_named_as_labels(tmp_path: Path) -> None:
    """They read as 'images could not be decoded'."""
    make_shards(tmp_path, shards=1, per_shard=20)
    with wds.TarWriter(str(tmp_path / "part-001.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"beyond{i}", "png": encode(i), "cls": b"5"})
    dataset = open_folder_or_shards(str(tmp_path), "val", 0.0, 0, None).dataset
    with warnings.catch_warnings(), pytest.raises(BadDataError, match=r"\d of 2\d samples \(\d.\d%\) of .* have a missing "
                                                                      "label or one that is not a class of the data, "
                                                                      r".*; fix the .cls labels or name every class "
                                                                      "they use in dataset.json"):
        warnings.simplefilter("ignore")
        ids_and_labels(dataset)
    make_shards(tmp_path / "both", shards=1, per_shard=20, bad=(3,))
    with wds.TarWriter(str(tmp_path / "both" / "a.tar")) as sink:  # read first
        sink.write({"__key__": "beyond", "png": encode(0), "cls": b"5"})
    dataset = open_folder_or_shards(str(tmp_path / "both"), "val", 0.0, 0, None).dataset
    with warnings.catch_warnings(), pytest.raises(BadDataError, match=r"are bad \(1 for their label, 1 for an image"):
        warnings.simplefilter("ignore")
        ids_and_labels(dataset)


@pytest.mark.parametrize("bad, said", [
    ((), "Skipped 1 of 301 samples of {} that have a missing label or one that is not a class of the data."),
    ((5,), "Skipped 2 of 301 samples of {} that are bad (1 for their label, 1 for an image that could not be "
           "decoded)."),
])
def test_reading_into_memory_sums_up_bad_samples_by_what_was_bad(tmp_path: Path, bad: tuple, said: str) -> None:
    """A sample skipped for its label was summed up as an image "that could not be decoded"."""
    make_shards(tmp_path, shards=1, per_shard=300, bad=bad)
    with wds.TarWriter(str(tmp_path / "part-001.tar")) as sink:
        sink.write({"__key__": "bad_class", "png": encode(0), "cls": b"7"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sources.read_into_memory(str(tmp_path), "train", 0.0, 0, in_chans=3, workers=0, progress=False)
    assert said.format(tmp_path) in [str(w.message) for w in caught]


def test_shards_with_too_many_bad_images_stop_with_one_sentence(tmp_path: Path) -> None:
    make_shards(tmp_path, shards=2, per_shard=10, bad=(1, 2, 15))
    dataset = open_folder_or_shards(str(tmp_path), "train", 0.0, 0, None).dataset
    with warnings.catch_warnings(), pytest.raises(BadDataError) as error:
        warnings.simplefilter("ignore")
        ids_and_labels(dataset, workers=2)
    message = str(error.value)
    assert "could not be decoded" in message and "Traceback" not in message and "\n" not in message


def test_shard_files_are_closed_once_read_or_abandoned(tmp_path: Path) -> None:
    """webdataset's reader left each shard file open for the garbage collector ("ResourceWarning: unclosed
    file"), whether the shards were counted, read whole, or left part-read."""
    make_shards(tmp_path, shards=2, per_shard=3)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", ResourceWarning)
        source = open_folder_or_shards(str(tmp_path), "train", 0.5, 0, None)  # a hold-out: counted first
        ids_and_labels(source.dataset)
        # The whole side, unshuffled: its first sample comes before the first shard's end (a training side's
        # shuffle buffer would read both shards first).
        part_read = iter(open_folder_or_shards(str(tmp_path), "val", 0.0, 0, None).dataset)
        next(part_read)
        del part_read
        gc.collect()
    assert not [w for w in said if issubclass(w.category, ResourceWarning)]


# Each tar member is a 512-byte header and its data padded to 512 bytes; these shards' members are 1024 bytes.
@pytest.mark.parametrize("suffix, keep", [
    (".tar", 2048),                 # cut between two members: tarfile alone would take it for the end
    (".tar", 2048 + 100),           # cut inside a member's header
    (".tar", 2048 + 512 + 20),      # cut inside a member's data
    (".tar.gz", 0.3), (".tar.gz", 0.5), (".tar.gz", 0.9),  # a compressed shard cut anywhere
    (".tar.gz", "garbage"),
])
def test_an_unreadable_shard_stops_with_one_sentence_naming_it(tmp_path: Path, suffix: str, keep) -> None:
    make_shards(tmp_path, shards=2, per_shard=10, suffix=suffix)
    shard = tmp_path / f"part-001{suffix}"
    data = shard.read_bytes()
    if keep == "garbage":
        shard.write_bytes(b"not a gzip stream" * 20)
    else:
        shard.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    # Read by DataLoader workers (the whole folder, no hold-out: no scan first) ...
    dataset = open_folder_or_shards(str(tmp_path), "train", 0.0, 0, None).dataset
    with pytest.raises(BadDataError) as error:
        ids_and_labels(dataset, workers=2)
    message = str(error.value)
    assert f"Shard {shard} cannot be read" in message and "truncated or damaged" in message
    assert "\n" not in message and "Traceback" not in message
    # ... and by the start-up scan that counts a hold-out.
    with pytest.raises(BadDataError, match=f"Shard {shard} cannot be read"):
        open_folder_or_shards(str(tmp_path), "train", 0.1, 0, None)


# --- bad paths, classes, decoding ----------------------------------------------------------------------


def test_missing_and_empty_paths_are_one_sentence(tmp_path: Path) -> None:
    make_shards(tmp_path / "shards", shards=2, per_shard=2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_images" / "a").mkdir(parents=True)
    cases = [
        (tmp_path / "missing", FileNotFoundError, "No file or folder matches"),
        (tmp_path / "empty", FileNotFoundError, "neither class sub-folders nor"),
        (tmp_path / "no_images", FileNotFoundError, "no images"),
        (tmp_path / "shards" / "*.tgz", FileNotFoundError, "No shards match /"),  # not "No shards matches"
        (tmp_path / "shards" / "part-{000..002}.tar", FileNotFoundError, "part-002.tar does not exist"),
    ]
    for path, error, words in cases:
        with pytest.raises(error, match=words):
            open_folder_or_shards(str(path), "train", 0.0, 0, None)
    with pytest.raises(ValueError, match="hold-out fraction"):
        open_folder_or_shards(str(tmp_path / "shards"), "train", 1.0, 0, None)
    with pytest.raises(ValueError, match="split"):
        open_folder_or_shards(str(tmp_path / "shards"), "test", 0.0, 0, None)


def test_check_same_classes(tmp_path: Path) -> None:
    from mlpmixer.data import load_mnist5k

    check_same_classes(["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match=r"\(3 classes instead of 2; with 'c'\)"):
        check_same_classes(["a", "b"], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\(2 classes instead of 3; without 'b'\)"):  # val/ lacking a class's folder
        check_same_classes(["a", "b", "c"], ["a", "c"])
    with pytest.raises(ValueError, match="class 1 is 'c' instead of 'b'") as other:
        check_same_classes(["a", "b"], ["a", "c"])
    assert "dataset.json" not in str(other.value) and "differ from those of the training data" in str(other.value)
    assert "fine-tune" not in str(other.value)  # said while training, where a new head is no way out
    # Classes named by number: a hint about dataset.json only where they are shards without one (not MNIST's).
    make_shards(tmp_path / "unnamed", shards=1, per_shard=4, classes=2, describe=False)
    with pytest.warns(UserWarning, match="No dataset.json"):
        unnamed = open_folder_or_shards(str(tmp_path / "unnamed"), "val", 0.0, 0, None).class_names
    for train, val in ((["cat", "dog"], unnamed), (unnamed, ["cat", "dog"])):
        with pytest.raises(ValueError, match="class 0 is .* instead of .*put one with the class names"):
            check_same_classes(train, val)
    with pytest.raises(ValueError, match=r"\(10 classes instead of 2; without 'cat', 'dog'; with '0', '1', '2', '3', "
                                         r"'4' and 5 more\); give both the same classes in the same order\.$"):
        check_same_classes(["cat", "dog"], load_mnist5k().class_names)


@pytest.fixture(params=["torchvision", "PIL"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each decoding test runs twice: with torchvision's decoders, and with PIL alone, as with a torchvision
    whose deprecated decoders are gone."""
    if request.param == "PIL":
        monkeypatch.setattr(sources, "decode_image", None)
    return request.param


@pytest.mark.parametrize(
    "fmt, mode, channels",
    [("PNG", "L", 1), ("PNG", "RGB", 3), ("PNG", "RGBA", 3), ("PNG", "P", 3), ("JPEG", "L", 1), ("JPEG", "RGB", 3),
     ("BMP", "RGB", 3), ("WEBP", "RGB", 3)],
)
def test_decode_gives_greyscale_or_rgb(fmt: str, mode: str, channels: int, decoder: str) -> None:
    pil = Image.new("RGB", (6, 4), (200, 30, 60)).convert(mode)
    image = decode_image_bytes(encode_pil(pil, fmt))
    assert image.dtype == torch.uint8 and image.shape == (channels, 4, 6)
    expected = torch.tensor(pil.convert("L" if channels == 1 else "RGB").getpixel((0, 0))).reshape(-1)
    assert (image[:, 0, 0].int() - expected).abs().max() <= 3  # lossy formats round a little


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "PPM"])  # PIL opens a 16-bit PGM as mode I, the others as I;16
def test_a_16_bit_image_keeps_its_top_8_bits(fmt: str, decoder: str) -> None:
    values = np.array([[0, 255, 256, 40000, 65535]], dtype=np.uint16)
    image = decode_image_bytes(encode_pil(Image.fromarray(values), fmt))
    assert image.dtype == torch.uint8 and image.shape == (1, 1, 5)
    assert image.flatten().tolist() == [0, 0, 1, 156, 255]


@pytest.mark.parametrize("values, kind, shown", [
    (np.array([[0, 255, 70000, 1_260_000]], dtype=np.int32), "32-bit integer", "0 to 1,260,000"),
    (np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32), "floating-point", "0 to 1"),
])
def test_greyscale_of_no_stated_range_is_refused(values: np.ndarray, kind: str, shown: str, decoder: str) -> None:
    """Read as 16-bit, 32-bit integers came out white (1,260,000) or black (0-255); floats in 0-1 came out 0 or 1."""
    with pytest.raises(ValueError, match=rf"^{kind} greyscale \(values {re.escape(shown)}\), whose range of values "
                                         r"the file does not state; convert it to 8- or 16-bit greyscale$"):
        decode_image_bytes(encode_pil(Image.fromarray(values), "TIFF"))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_decode_turns_images_upright_as_their_exif_orientation_says(fmt: str, decoder: str) -> None:
    stored = Image.new("RGB", (6, 4), (255, 255, 255))
    stored.paste((0, 0, 0), (0, 0, 3, 4))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90° clockwise: 4 wide, 6 high, the black half on top
    out = io.BytesIO()
    stored.save(out, fmt, exif=exif.tobytes(), quality=100)
    image = decode_image_bytes(out.getvalue())
    assert image.shape == (3, 6, 4)
    assert image[:, :2].float().mean() < 40 and image[:, -2:].float().mean() > 215


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_decode_composites_transparent_pixels_over_white(mode: str, decoder: str) -> None:
    """Black line art on a transparent background hides black under it: dropping the alpha made it all black."""
    alpha = np.zeros((4, 6), dtype=np.uint8)
    alpha[:, :3] = 255  # the left half drawn (black), the right half transparent (black underneath)
    if mode == "P":
        pil = Image.frombytes("P", (6, 4), (alpha == 0).astype(np.uint8).tobytes())  # 0 black, 1 black and transparent
        pil.putpalette([0, 0, 0, 0, 0, 0])
        data = encode_pil(pil, "PNG", transparency=1)
    else:
        pil = Image.fromarray(np.zeros((4, 6), dtype=np.uint8)).convert(mode[:-1])
        pil.putalpha(Image.fromarray(alpha))
        data = encode_pil(pil, "PNG")
    image = decode_image_bytes(data)
    assert image.shape == (1 if mode == "LA" else 3, 4, 6)
    assert image[:, :, :3].max() == 0 and image[:, :, 3:].min() == 255


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP"])
def test_an_image_past_pils_pixel_limit_decodes_without_its_warning(fmt: str, decoder: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """PIL's DecompressionBombWarning, past half the size it refuses, named no file and came from every DataLoader
    worker, for an image decoded all the same; past the limit the image is "too large", a bad sample."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30)  # PIL warns past 30 pixels and refuses past 60
    big = Image.new("RGBA", (8, 6), (200, 30, 60, 255))  # 48 pixels; PNGs with an alpha channel go to PIL
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        image = decode_image_bytes(encode_pil(big if fmt == "PNG" else big.convert("RGB"), fmt))
    assert image.shape == (3, 6, 8) and [str(w.message) for w in seen] == []
    with pytest.raises(ValueError, match="too large: 64 pixels"):
        decode_image_bytes(encode_pil(Image.new("RGBA", (8, 8)), "PNG"))


def test_an_opaque_palette_png_reads_as_its_colours() -> None:
    pil = Image.frombytes("P", (6, 4), bytes(range(24)))  # palette indices 0-23, row by row
    pil.putpalette([v for i in range(24) for v in (10 * i, 255 - 10 * i, 7)])
    image = decode_image_bytes(encode_pil(pil, "PNG"))
    assert torch.equal(image, torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1))


@pytest.mark.parametrize("data, reason", [
    (encode(1, "JPEG")[:300], "damaged or truncated image: "),
    (encode(1, "PNG")[:60], "damaged or truncated image: "),
    (b"\x89PNG\r\n\x1a\n", "not an image"),
    (b"this is not an image\n", "not an image"),
], ids=["truncated JPEG", "truncated PNG", "PNG signature alone", "text"])
def test_an_unreadable_image_is_said_in_plain_words(data: bytes, reason: str) -> None:
    """Not torchvision's C++ source line, nor PIL's name of an io.BytesIO object."""
    with pytest.raises(ValueError, match=reason) as said:
        decode_image_bytes(data)
    assert ".cpp" not in str(said.value) and "BytesIO" not in str(said.value)


def test_a_folder_reads_gif_images(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("P", (5, 5)).save(tmp_path / name / "frame.gif")
    source = open_folder_or_shards(str(tmp_path), "train", 0.0, 0, None)
    assert source.num_examples == 2 and source.dataset[0][0].shape == (3, 5, 5)


def encode_pil(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


# --- real data -----------------------------------------------------------------------------------------


def test_a_real_cifar10_shard() -> None:
    from mlpmixer.transforms import train_transform

    shard = SHARED_DATA / "cifar10" / "train-000.tar.gz"
    source = open_folder_or_shards(str(shard), "train", 0.0, 0, train_transform(32, 3))
    assert source.class_names[:3] == ["airplane", "automobile", "bird"] and len(source.class_names) == 10
    assert source.num_examples == 10000  # 50,000 images in 5 shards
    labels = []
    for image, label in source.dataset:
        assert image.shape == (3, 32, 32) and -1 <= image.min() and image.max() <= 1
        labels.append(label)
        if len(labels) == 300:
            break
    assert len(labels) == 300 and set(labels) == set(range(10))
    assert source.dataset.bad_samples.bad == 0
