"""The training loop: run-directory files, schedules, losses, resume, divergence."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import mlpmixer.train as train_mod
from mlpmixer import load_checkpoint
from mlpmixer.recipes import RECIPES, Recipe, get_recipe
from mlpmixer.sources import open_folder_or_shards
from mlpmixer.train import TrainingDiverged, loader_batches, loss_fn, lr_at, rebatch, train


def tiny(**changes) -> Recipe:
    """The default recipe cut to a few small steps."""
    return get_recipe("mnist5k", **{"steps": 4, "batch_size": 32, "evals": 2, **changes})


def state_copied(run: Path, step: int, into: Path) -> Path:
    """A new run folder `into` holding only `run`'s training state of `step`: resumed, it goes on from there."""
    (into / "checkpoints").mkdir(parents=True)
    state = run / "checkpoints" / f"step-{step:08d}.pt"
    (into / "checkpoints" / state.name).write_bytes(state.read_bytes())
    return into


def test_a_short_run_writes_every_file(tmp_path: Path) -> None:
    files = train(tiny(), tmp_path / "run", progress=False, log=lambda *_: None)
    for f in (files.model, files.config, files.metrics, files.curves):
        assert f.is_file() and f.stat().st_size > 0
    before = {f: f.read_bytes() for f in (files.model, files.config, files.metrics)}
    with pytest.raises(FileExistsError, match="holds a run already; give another --out, or delete it"):
        train(tiny(), tmp_path / "run", progress=False, log=lambda *_: None)  # not over the finished run
    assert all(f.read_bytes() == data for f, data in before.items())
    assert files.curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads(files.config.read_text())
    assert config["recipe"]["data"] == "mnist5k" and config["model"]["in_chans"] == 1
    rows = [json.loads(line) for line in files.metrics.read_text().splitlines()]
    assert any("train_loss" in r for r in rows) and sum("val_top1" in r for r in rows) == 2
    assert all(r["val_n"] == 250 for r in rows if "val_n" in r)
    model = load_checkpoint(tmp_path / "run")
    assert model.class_names == [str(i) for i in range(10)] and model.num_classes == 10
    assert model.config.to_dict() == config["model"]
    assert model.head.weight.abs().sum() > 0  # it trained (the head starts at zero)


def test_in_memory_training_data_is_evaluated_on_any_eval_data(tmp_path: Path) -> None:
    """--eval-data replaces the hold-out, whatever its source; missing or other-class data stop the run."""
    from test_sources import make_folder

    make_folder(tmp_path / "digits", {str(i): 2 for i in range(10)})
    said: list[str] = []
    files = train(tiny(eval_data=str(tmp_path / "digits"), evals=1), tmp_path / "run", progress=False,
                  log=said.append)
    assert "(5000 images, validating on 20, 10 classes)" in said[0]  # nothing held out: the 20 of --eval-data
    rows = [json.loads(line) for line in files.metrics.read_text().splitlines()]
    assert [r["val_n"] for r in rows if "val_n" in r] == [20]
    from test_fewshot import write_idx_digits

    idx = write_idx_digits(tmp_path / "idx", per_class=3)
    files = train(tiny(eval_data=idx, evals=1), tmp_path / "run1", progress=False, log=lambda *_: None)
    assert [json.loads(line).get("val_n") for line in files.metrics.read_text().splitlines()][-1] == 30
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(tiny(eval_data=str(tmp_path / "nowhere")), tmp_path / "run2", progress=False, log=lambda *_: None)
    make_folder(tmp_path / "letters", {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="2 classes instead of 10"):
        train(tiny(eval_data=str(tmp_path / "letters")), tmp_path / "run3", progress=False, log=lambda *_: None)
    assert not (tmp_path / "run2").exists() and not (tmp_path / "run3").exists()


def test_a_validation_stopped_by_bad_images_keeps_the_training_done(tmp_path: Path) -> None:
    """Too many bad validation images stopped the run before that step's state was saved: with one validation,
    at the end, the whole run was lost. The state is saved first, and --resume (the images fixed) goes on from it,
    redoing that validation, to the weights of a run that never stopped."""
    import shutil

    from test_sources import make_folder

    make_folder(tmp_path / "f", {"a": 16, "b": 16})
    make_folder(tmp_path / "v", {"a": 12, "b": 12}, bad=(3, 15))  # 2 of 24: more than the 1% allowed
    r = tiny(data=str(tmp_path / "f"), eval_data=str(tmp_path / "v"), model="nano/4", img_size=8, batch_size=8,
             steps=4, evals=2, holdout=0, workers=0, threads=1)  # one thread: the same sums in every run
    with warnings.catch_warnings(), pytest.raises(ValueError) as stopped:
        warnings.simplefilter("ignore")  # each bad image's warning
        train(r, tmp_path / "run", progress=False, log=lambda *_: None)
    state = tmp_path / "run" / "checkpoints" / "step-00000002.pt"
    assert str(stopped.value) == (f"2 of 24 images (8.3%) of {tmp_path / 'v'} could not be decoded, more than the 1% "
                                  "allowed; check or rebuild the data (the warnings name the bad files); the training "
                                  f"state of step 2 was saved first ({state}): fix the validation data and add --resume "
                                  "to go on from it.")
    assert train_mod.latest_state(tmp_path / "run") == state
    shutil.rmtree(tmp_path / "v")
    make_folder(tmp_path / "v", {"a": 12, "b": 12})
    files = train(r, tmp_path / "run", resume=True, progress=False, log=lambda *_: None)
    rows = [json.loads(line) for line in files.metrics.read_text().splitlines()]
    assert [row["step"] for row in rows if "val_top1" in row] == [2, 4]
    whole = train(r, tmp_path / "whole", progress=False, log=lambda *_: None)
    resumed, uninterrupted = load_checkpoint(files.model).state_dict(), load_checkpoint(whole.model).state_dict()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_a_folders_holdout_count_is_exact_and_a_val_folder_needs_none(tmp_path: Path) -> None:
    from test_sources import make_folder

    make_folder(tmp_path / "f", {"a": 20, "b": 20})
    r = tiny(data=str(tmp_path / "f"), img_size=14, workers=0, batch_size=8, steps=1, evals=1)
    assert r.holdout == 250  # the default job's count, more than this folder holds
    # Said with where 250 came from (the user gave no --holdout) and how to change it; digits in memory alike.
    with pytest.raises(ValueError, match=r"^Cannot hold out 250 of the 40 images of .*f \(250 is the mnist5k recipe's "
                                         r"hold-out, used unless --holdout is given\); give --holdout as a smaller count "
                                         r"or a fraction \(such as 0.1\), or validate on --eval-data.$"):
        train(r, tmp_path / "run", progress=False, log=lambda *_: None)
    from test_fewshot import write_idx_digits

    with pytest.raises(ValueError, match=r"^Cannot hold out 250 of the 30 images of .*idx \(250 is the mnist5k "):
        train(r.replace(data=write_idx_digits(tmp_path / "idx", per_class=3)), tmp_path / "run", progress=False,
              log=lambda *_: None)
    with pytest.raises(ValueError, match=r"^Cannot hold out 40 of the 40 images of .*f; give --holdout as a smaller"):
        train(r.replace(holdout=40), tmp_path / "run", progress=False, log=lambda *_: None)

    def scored(recipe: Recipe, out: str) -> int:
        files = train(recipe, tmp_path / out, progress=False, log=lambda *_: None)
        return [json.loads(line).get("val_n") for line in files.metrics.read_text().splitlines()][-1]

    assert scored(r.replace(holdout=6), "six") == 6
    make_folder(tmp_path / "pair" / "train", {"a": 20, "b": 20})
    make_folder(tmp_path / "pair" / "val", {"a": 2, "b": 3}, start=100)
    assert scored(r.replace(data=str(tmp_path / "pair")), "pair") == 5  # val/ is the validation data, whole


def test_a_folder_run_is_validated_on_digits_held_in_memory(tmp_path: Path) -> None:
    """--eval-data takes every kind of --data: mnist5k or an IDX folder beside image-folder training data."""
    from test_sources import SHARED_DATA, make_folder

    make_folder(tmp_path / "f", {str(digit): 2 for digit in range(10)})
    r = tiny(data=str(tmp_path / "f"), img_size=28, workers=0, batch_size=8, steps=1, evals=1,
             eval_data=str(SHARED_DATA / "mnist"))
    files = train(r, tmp_path / "run", progress=False, log=lambda *_: None)
    rows = [json.loads(line) for line in files.metrics.read_text().splitlines()]
    assert rows[-1]["val_n"] == 10_000  # the MNIST test set, whole


def test_rebatch_gives_exact_batches_in_order() -> None:
    sizes = [5, 5, 2, 5, 1]  # what workers hand over: full batches and each one's short last batch
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    batches = [(torch.arange(a, a + n), torch.arange(a, a + n) % 3) for a, n in zip(starts, sizes)]
    out = list(rebatch(batches, 4))
    assert [len(x) for x, _ in out] == [4, 4, 4, 4]  # 18 images: four batches, two left over
    assert torch.equal(torch.cat([x for x, _ in out]), torch.arange(16))
    assert all(torch.equal(y, x % 3) for x, y in out)


def test_shard_epochs_are_whole_with_several_workers(tmp_path: Path) -> None:
    """Each worker's share ends in a short batch; an epoch must still hold len // batch steps."""
    from test_sources import make_shards, sample_id

    make_shards(tmp_path / "shards", shards=2, per_shard=11)
    source = open_folder_or_shards(str(tmp_path / "shards"), "train", 0.25, 0, None)
    batch, per_epoch = 4, source.num_examples // 4
    epochs = []
    batches = loader_batches(source.dataset, tiny(workers=3), batch, 1, 0, per_epoch, 0, 1)
    for _ in range(2):
        seen = [sample_id(img) for _ in range(per_epoch) for img in next(batches)[0][0]]
        assert len(set(seen)) == len(seen) == per_epoch * batch  # no image twice within an epoch
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # the second epoch is a new shuffle, not a repeat


def test_folder_ranks_take_their_slice_of_the_one_process_augmented_batch(tmp_path: Path) -> None:
    from test_sources import make_folder
    from mlpmixer.transforms import train_transform

    make_folder(tmp_path / "data", {"a": 10, "b": 10})
    augment = train_transform(8, randaugment_m=15)
    source = open_folder_or_shards(str(tmp_path / "data"), "train", 0.0, 0, augment, replace_bad=True)
    r = tiny(workers=2)
    one = loader_batches(source.dataset, r, 8, 1, 3, 2, 0, 1)  # from step 3: in the second epoch
    ranks = [loader_batches(source.dataset, r.replace(workers=0), 8, 1, 3, 2, rank, 2) for rank in (0, 1)]
    for _ in range(2):
        (x, y), = next(one)
        for rank, batches in enumerate(ranks):
            (x_rank, y_rank), = next(batches)
            assert torch.equal(x_rank, x[rank::2]) and torch.equal(y_rank, y[rank::2])


def shard_steps(dataset, start: int, steps: int, per_epoch: int, batch: int = 15) -> list[list[int]]:
    """The sample numbers of each step's batch from `start`, as training draws them."""
    from test_sources import sample_id

    batches = loader_batches(dataset, tiny(workers=0), batch, 1, start, per_epoch, 0, 1)
    return [[sample_id(image) for image in next(batches)[0][0]] for _ in range(steps)]


def test_shard_epochs_go_on_when_a_pass_holds_fewer_images_than_counted(tmp_path: Path) -> None:
    """One bad image among 150, batches of 15: a pass made 9 batches where the epoch counts 10, and the run
    stopped ('fewer images than one batch ... per pass'), at the end of epoch 1 and again on --resume."""
    from test_sources import make_shards

    make_shards(tmp_path / "shards", shards=2, per_shard=75, bad=(10,))
    source = open_folder_or_shards(str(tmp_path / "shards"), "train", 0.0, 0, None)
    per_epoch = source.num_examples // 15
    with pytest.warns(UserWarning) as said:
        steps = shard_steps(source.dataset, 0, 3 * per_epoch, per_epoch)
    assert sum("held fewer images than counted" in str(w.message) for w in said) == 1  # once, not per epoch
    for epoch in range(3):
        seen = [i for step in steps[epoch * per_epoch:(epoch + 1) * per_epoch] for i in step]
        assert len(seen) == 150 and set(seen) == set(range(150)) - {10}  # one image twice
    assert source.dataset.bad_samples.bad == 1  # the 1% rule still counts it, once
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert shard_steps(source.dataset, 19, 6, per_epoch) == steps[19:25]  # resumed mid-epoch, at its end too
        # dataset.json counts more images than the shards hold: the epoch takes them from its start again.
        (tmp_path / "shards" / "dataset.json").write_text(json.dumps({"splits": {"train": 200}}))
        more = open_folder_or_shards(str(tmp_path / "shards"), "val", 0.0, 0, None).dataset  # in shard order
        steps = shard_steps(more, 0, 2 * 13, 13)
    one_pass = [i for i in range(150) if i != 10]
    assert [i for step in steps[:13] for i in step] == (one_pass + one_pass)[:195]
    assert steps[13:] == steps[:13]


def test_shards_with_a_bad_image_train_their_epochs_and_resume(tmp_path: Path) -> None:
    """The audit's run: 150 samples, one of them cut short, batches of 15, 3 epochs; killed and resumed."""
    from test_sources import make_shards

    make_shards(tmp_path / "shards", shards=1, per_shard=150, bad=(7,), classes=10)
    r = get_recipe("cifar10-nano", data=str(tmp_path / "shards"), img_size=8, augment_on="workers", workers=0,
                   batch_size=15, epochs=3, holdout=0, evals=1)
    with pytest.warns(UserWarning) as said:
        files = train(r, tmp_path / "run", save_every=5, progress=False, log=lambda *_: None)
    said = " ".join(str(w.message) for w in said)
    assert "Skipping" in said and "sample00007" in said and "fewer images than counted" in said
    rows = [json.loads(line) for line in files.metrics.read_text().splitlines()]
    assert max(row["step"] for row in rows) == 30 and rows[-1]["bad_samples"] == 1
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    state = "step-00000025.pt"  # in epoch 3, whose last step takes an image from its start again
    (cut / "checkpoints" / state).write_bytes((tmp_path / "run" / "checkpoints" / state).read_bytes())
    with pytest.warns(UserWarning, match="sample00007|fewer images than counted"):
        train(r, cut, resume=True, save_every=5, progress=False, log=lambda *_: None)
    assert (cut / "model.safetensors").is_file()


def test_passes_over_shards_without_a_count_are_new_shuffles_and_resume_alike(tmp_path: Path) -> None:
    """Their run is one epoch of many passes, and every pass repeated the first one's order and draws."""
    from test_sources import make_shards, sample_id

    make_shards(tmp_path / "shards", shards=1, per_shard=60, describe=False)
    (tmp_path / "shards" / "dataset.json").write_text(json.dumps({"classes": ["a", "b", "c"]}))
    dataset = open_folder_or_shards(str(tmp_path / "shards"), "train", 0.0, 0, None).dataset
    assert dataset.num_examples is None

    def steps(start: int, n: int) -> list[list[int]]:  # 4 steps a pass; the run's one epoch is its 12 steps
        batches = loader_batches(dataset, tiny(workers=0), 15, 1, start, 12, 0, 1, counted=False)
        return [[sample_id(image) for image in next(batches)[0][0]] for _ in range(n)]

    run = steps(0, 12)
    passes = [sum(run[i:i + 4], []) for i in (0, 4, 8)]
    assert all(sorted(p) == list(range(60)) for p in passes)  # each pass is whole
    assert passes[0] != passes[1] != passes[2] != passes[0]  # and shuffled anew
    assert steps(6, 6) == run[6:]  # a run resumed in its second pass draws what the whole run drew


def test_the_epoch_of_shards_without_a_count_is_null(tmp_path: Path) -> None:
    """It was the fraction of the run (done / steps): 1.0 at the end of 20 steps over 60 images, 5 passes."""
    from test_sources import make_shards

    make_shards(tmp_path / "shards", shards=1, per_shard=60, classes=10, describe=False)
    (tmp_path / "shards" / "dataset.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(10)]}))
    r = get_recipe("cifar10-nano", data=str(tmp_path / "shards"), img_size=8, augment_on="workers", workers=0,
                   batch_size=15, steps=20, holdout=0, evals=0)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        files = train(r, tmp_path / "run", progress=False, log=lambda *_: None)
    rows = [json.loads(line) for line in files.metrics.read_text().splitlines()]
    assert [row["step"] for row in rows] == [10, 20] and all(row["epoch"] is None for row in rows)
    # There is no count for a pass to fall short of: each one ended with "fewer images than counted".
    assert not [w for w in said if "fewer images than counted" in str(w.message)]


def test_the_speed_after_resuming_shards_leaves_out_the_replay_of_the_epoch(tmp_path: Path, monkeypatch) -> None:
    """A clock that ticks once per image read: img_per_s is 1.0 where it counts the images trained on. Resumed
    at step 5, the run reads the epoch's first 5 steps again, and step 10's entry said 0.5."""
    from types import SimpleNamespace
    from mlpmixer.sources import ShardDataset
    from test_sources import make_shards

    clock = [0.0]
    decode = ShardDataset._decode

    def read(self, sample):
        clock[0] += 1
        return decode(self, sample)

    monkeypatch.setattr(ShardDataset, "_decode", read)
    monkeypatch.setattr(train_mod, "time", SimpleNamespace(time=lambda: clock[0]))
    make_shards(tmp_path / "shards", shards=1, per_shard=150, classes=10)  # 10 steps of 15 an epoch
    r = get_recipe("cifar10-nano", data=str(tmp_path / "shards"), img_size=8, augment_on="workers", workers=0,
                   batch_size=15, steps=10, holdout=0, evals=0)
    quiet = dict(progress=False, log=lambda *_: None)
    full = train(r, tmp_path / "full", save_every=5, **quiet)
    cut = state_copied(full.out, 5, tmp_path / "cut")
    train(r, cut, resume=True, **quiet)
    for run in (full.out, cut):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [row["img_per_s"] for row in rows if "img_per_s" in row] == [1.0]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_metrics_end_with_the_bad_image_count_of_the_error_that_stops_the_run(tmp_path: Path) -> None:
    """4 bad images of 300 stop the run once 300 are seen (step 20's batch); the last line, of step 10, lagged."""
    from mlpmixer.sources import BadDataError
    from test_sources import make_shards

    make_shards(tmp_path / "shards", shards=1, per_shard=300, bad=(200, 210, 220, 230), classes=10)
    r = get_recipe("cifar10-nano", data=str(tmp_path / "shards"), img_size=8, augment_on="workers", workers=0,
                   batch_size=15, steps=40, holdout=0, evals=0)
    with pytest.raises(BadDataError, match=r"^4 of 300 images") as stop:
        train(r, tmp_path / "run", progress=False, log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert stop.value.bad == 4 and rows[-1] == {"step": 19, "epoch": 0.95, "bad_samples": 4}  # 19 steps done


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bad_images_stop_a_run_of_two_processes_too(tmp_path: Path) -> None:
    """Each process reads half of every epoch and counts its own images: checked after the whole window, its 300,
    a one-epoch run of 2 processes never checked, and ended "Done" on data 3% bad."""
    from test_sources import make_shards

    make_shards(tmp_path / "shards", shards=1, per_shard=300, bad=tuple(range(200, 210)), classes=10)
    r = get_recipe("cifar10-nano", data=str(tmp_path / "shards"), img_size=8, augment_on="workers", workers=0,
                   batch_size=20, steps=15, holdout=0, evals=0, processes=2, threads=1)  # one epoch
    with pytest.raises(ValueError, match=r"^\d+ of 150 images \(\d.\d%\) of .*shards could not be decoded, more "
                                         r"than the 1% allowed"):
        train_mod.launch(r, tmp_path / "run", progress=False, log=lambda *_: None)


def test_too_few_images_for_one_batch_per_pass_stop_the_run(tmp_path: Path) -> None:
    from test_sources import make_shards

    make_shards(tmp_path / "shards", shards=1, per_shard=10)
    dataset = open_folder_or_shards(str(tmp_path / "shards"), "train", 0.0, 0, None).dataset
    with pytest.raises(ValueError, match="fewer images than one batch of 15 per pass"):
        shard_steps(dataset, 0, 1, 1)


@pytest.mark.parametrize("steps", [None, 2])
def test_a_folder_of_fewer_images_than_one_batch_is_one_sentence(tmp_path: Path, steps) -> None:
    """It was an IndexError of loader_batches with --steps, and 'does not say how many images it holds'
    without (the reported run: 60 images, --holdout 6, the default batch of 128)."""
    from test_sources import make_folder

    make_folder(tmp_path / "data", {"a": 4, "b": 4, "c": 4})
    r = get_recipe("cifar10-nano", data=str(tmp_path / "data"), img_size=8, augment_on="workers", workers=0,
                   batch_size=16, steps=steps, epochs=1, holdout=2, evals=0)
    with pytest.raises(ValueError, match=r"^The batch size 16 is larger than the 10 training images; "
                                         r"lower --batch-size\.$"):
        train(r, tmp_path / "run", progress=False, log=lambda *_: None)
    files = train(r.replace(batch_size=5), tmp_path / "run", progress=False, log=lambda *_: None)  # starts over
    assert files.model.is_file()


def test_a_folder_of_one_class_is_refused(tmp_path: Path) -> None:
    """It trained, with a softmax loss of 0 from the first step (and curves that could not be drawn)."""
    from test_sources import make_folder

    make_folder(tmp_path / "data", {"cats": 12})
    r = get_recipe("cifar10-nano", data=str(tmp_path / "data"), img_size=8, augment_on="workers", workers=0,
                   batch_size=4, steps=2, holdout=2, evals=0)
    with pytest.raises(ValueError, match=r"holds one class \(cats\); a classifier needs images of two or more\.$"):
        train(r, tmp_path / "run", progress=False, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_cifar_style_augmentation_in_the_workers_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--pad-crop and --mix-prob reach the workers' transform and the batch mixing."""
    import mlpmixer.transforms as transforms
    from test_sources import make_shards

    make_shards(tmp_path / "shards", shards=2, per_shard=20, classes=4)
    made = {}
    real_train, real_mix = transforms.train_transform, transforms.mixup_cutmix

    def train_transform(*args, **kwargs):
        made["crop"] = kwargs
        return real_train(*args, **kwargs)

    def mixup_cutmix(*args):
        made["mix"] = args
        return real_mix(*args)

    monkeypatch.setattr(transforms, "train_transform", train_transform)
    monkeypatch.setattr(transforms, "mixup_cutmix", mixup_cutmix)
    r = get_recipe("cifar10-nano", data=str(tmp_path / "shards"), img_size=8, augment_on="workers", workers=0,
                   batch_size=8, steps=2, evals=1, holdout=0.2)
    files = train(r, tmp_path / "run", progress=False, log=lambda *_: None)
    assert made["crop"]["pad_crop"] == 4 and made["mix"] == (4, 0.0, 1.0, 0.5)
    assert load_checkpoint(files.model).head.weight.abs().sum() > 0


def test_schedules() -> None:
    r = Recipe(lr=1.0, warmup=10, min_lr=0.1)
    assert lr_at(0, 100, r) == pytest.approx(0.1) and lr_at(9, 100, r) == pytest.approx(1.0)
    assert lr_at(100, 100, r) == pytest.approx(0.1)
    assert lr_at(99, 100, r) > 0.1  # the last step run: one short of min_lr, as lr_at says
    assert lr_at(55, 100, r) == pytest.approx(0.55)  # cosine half-way
    lin = r.replace(schedule="linear")
    assert lr_at(55, 100, lin) == pytest.approx(0.55) and lr_at(32, 100, lin) == pytest.approx(0.1 + 0.9 * 68 / 90)
    assert lr_at(2, 100, Recipe(lr=1.0, warmup=0.1)) == pytest.approx(0.3)  # a fraction of the run


def test_softmax_and_sigmoid_losses() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    y = torch.tensor([0])
    assert loss_fn(logits, y, Recipe()) == pytest.approx(-torch.log_softmax(logits, 1)[0, 0].item())
    expected = -(math.log(torch.sigmoid(torch.tensor(2.0)).item()) + math.log(0.5) + math.log(1 - torch.sigmoid(torch.tensor(-1.0)).item()))
    assert loss_fn(logits, y, Recipe(loss="sigmoid")).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="--loss must be one of softmax, sigmoid"):
        Recipe(loss="hinge")


def test_resume_checks_the_model_and_notes_other_settings(tmp_path: Path) -> None:
    r = tiny(steps=4, evals=0)
    run = tmp_path / "run"
    train(r, run, save_every=2, progress=False, log=lambda *_: None)
    metrics = (run / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"trains Mixer-digits/7 \(28×28, 1 channel, 10 classes\) and this command "
                                         r"builds Mixer\(C=24, N=4, P=7\) \(28×28, 1 channel, 10 classes\); resume"):
        train(r.replace(model_args={**r.model_args, "hidden_dim": 24}), run, resume=True, progress=False,
              log=lambda *_: None)
    with pytest.raises(ValueError, match="trained with --optimizer adamw, whose saved state --optimizer sgd cannot"):
        train(r.replace(optimizer="sgd"), run, resume=True, progress=False, log=lambda *_: None)
    with pytest.raises(FileExistsError, match="holds a run already; add --resume to go on from its last saved state"):
        train(r, run, progress=False, log=lambda *_: None)
    # ... before any data are read (CIFAR-10 was decoded for 15 s before the refusal).
    def unread(*_args, **_kwargs):
        raise AssertionError("the data were read before the run folder was checked")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_mod, "load_tensors", unread)
        with pytest.raises(FileExistsError, match="holds a run already"):
            train(r, run, progress=False, log=lambda *_: None)
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing written
    said: list[str] = []
    # save_every=0: each resume goes on from the state of step 4 again (by default it saves as the run did).
    with pytest.raises(ValueError, match="beyond the 3 steps of this command's run"):  # no note of going on
        train(r.replace(steps=3), run, resume=True, progress=False, log=said.append)
    assert said == []
    train(r.replace(steps=6), run, resume=True, save_every=0, progress=False, log=said.append)
    assert said[0].startswith("Resuming with settings other than the run's (steps 4 -> 6):")
    said.clear()
    train(r.replace(steps=6), run, resume=True, save_every=0, progress=False, log=said.append)  # the same settings: no note
    assert not any(line.startswith("Resuming with") for line in said)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "world_size": 2}))  # as a run of two processes
    said.clear()
    train(r.replace(steps=6), run, resume=True, save_every=0, progress=False, log=said.append)
    assert said[0].startswith("Resuming with settings other than the run's (processes 2 -> 1):")


def test_resume_keeps_the_runs_saving_and_where_a_fine_tuning_run_started(tmp_path: Path) -> None:
    """config.json held the recipe, not --save-every and --keep: a run resumed through it (as the refusal to resume
    with other settings advised) saved no state again, so a second kill lost all it did after the resume. A
    fine-tuning run resumed with another --from recorded that one as where it started."""
    r = tiny(steps=4, evals=0)
    run = tmp_path / "run"
    train(r, run, save_every=2, keep=5, progress=False, log=lambda *_: None)
    config = json.loads((run / "config.json").read_text())
    assert (config["save_every"], config["keep"]) == (2, 5)
    train(r.replace(steps=8), run, resume=True, progress=False, log=lambda *_: None)  # no save_every given
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*.pt")) == [
        f"step-{n:08d}.pt" for n in (2, 4, 6, 8)]
    with pytest.raises(ValueError, match=rf"resume it with its own settings: mixer train --config "
                                         rf"{run / 'config.json'} --out {run} --resume\."):
        train(r.replace(model_args={**r.model_args, "hidden_dim": 24}), run, resume=True, progress=False,
              log=lambda *_: None)
    # Fine-tuning from the run, then resuming with another --from: said, and config.json keeps where it started.
    ft = tmp_path / "ft"
    train(r, ft, init_from=str(run), save_every=2, progress=False, log=lambda *_: None)
    said: list[str] = []
    other = run / "checkpoints" / "step-00000002.pt"
    train(r.replace(steps=6), ft, resume=True, init_from=str(other), progress=False, log=said.append)
    assert f"Note: --from {other} is not where {ft} started ({run}); the model is built from it" in "\n".join(said)
    assert json.loads((ft / "config.json").read_text())["init_from"] == str(run)
    assert (ft / "checkpoints" / "step-00000006.pt").exists()  # the fine-tuning run's own saving, kept too
    said.clear()  # the same checkpoint spelled otherwise (the run's model file) is no other --from
    train(r.replace(steps=8), ft, resume=True, init_from=str(run / "model.safetensors"), progress=False,
          log=said.append)
    assert not any("is not where" in line for line in said)
    # A run trained from scratch, resumed as a fine-tuning: it was recorded as a fine-tuning of that --from.
    with pytest.raises(ValueError, match=rf"{run} trains a model from scratch, not a fine-tuning; resume it with its "
                                         rf"own settings: mixer train --config {run / 'config.json'} --out {run} "
                                         r"--resume\."):
        train(r.replace(steps=10), run, resume=True, init_from=str(ft), progress=False, log=lambda *_: None)
    assert "init_from" not in json.loads((run / "config.json").read_text())
    # A run whose config.json predates the record of --save-every: its resume says it saves nothing.
    config = json.loads((run / "config.json").read_text())
    del config["save_every"], config["keep"]
    (run / "config.json").write_text(json.dumps(config))
    said.clear()
    train(r.replace(steps=10), run, resume=True, progress=False, log=said.append)
    assert f"Note: {run}/config.json predates the record of --save-every, so this resume saves no training state; " \
        "give --save-every N to keep saving." in said


def test_a_damaged_state_or_one_of_other_shapes_is_one_sentence(tmp_path: Path) -> None:
    r = tiny(steps=4, evals=0)
    run = tmp_path / "run"
    train(r, run, save_every=2, progress=False, log=lambda *_: None)
    last = run / "checkpoints" / "step-00000004.pt"
    good = last.read_bytes()
    middle = len(good) // 2  # in the weights: bytes changed there, the archive whole, would load as other weights
    flipped = good[:middle] + bytes(b ^ 0xFF for b in good[middle:middle + 16]) + good[middle + 16:]
    for damaged in (good[:1000], b"", b"not a checkpoint at all", pickle.dumps(Exception("crafted")), flipped):
        last.write_bytes(damaged)
        with pytest.raises(ValueError, match=r"step-00000004.pt is not a readable training state \(truncated, "
                                             r"damaged, or not written by mixer train\); move it out of .* or delete "
                                             r"it, and rerun to go on from the state before it, step-00000002.pt\."):
            train(r, run, resume=True, progress=False, log=lambda *_: None)
    last.write_bytes(good)
    (run / "config.json").unlink()  # no configuration to compare with: the state's shapes decide
    with pytest.raises(ValueError, match=r"step-00000004.pt holds weights of other shapes than the Mixer-digits/4 "
                                         r"this command builds; resume with the run's own settings"):
        train(get_recipe("mnist5k", model="digits/4", steps=4, batch_size=32), run, resume=True, progress=False,
              log=lambda *_: None)


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_stopped_before_its_first_state_starts_over(tmp_path: Path, resume: bool) -> None:
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="larger than the 4750 training images"):  # found once the folder exists
        train(tiny(batch_size=10_000), run, save_every=2, progress=False, log=lambda *_: None)
    assert (run / "config.json").exists()
    said: list[str] = []
    train(tiny(steps=2, evals=0), run, resume=resume, save_every=2, progress=False, log=said.append)
    assert said[0] == (f"Note: {run} holds no saved training state and no model (the run there stopped before its "
                       "first save); starting it over.")
    assert (run / "model.safetensors").exists()
    assert json.loads((run / "config.json").read_text())["recipe"]["batch_size"] == 32


def test_image_augmentation_flags_on_in_memory_data_are_named_as_unused(tmp_path: Path) -> None:
    said: list[str] = []
    train(tiny(steps=1, evals=0, mixup=0.2, randaugment=0, augment_on="device"), tmp_path / "run", progress=False,
          log=said.append)
    assert said[0].startswith("--augment-on device is for image folders and shards; mnist5k is in memory already")
    assert said[1] == ("Note: --randaugment, --mixup augment image folders and shards; mnist5k is in memory and "
                       "augmented with digits_aug only, so they are not used.")
    said.clear()
    train(tiny(steps=1, evals=0), tmp_path / "plain", progress=False, log=said.append)
    assert not any("not used" in line for line in said)


def test_resume_drops_a_damaged_last_metrics_line_and_names_malformed_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = tiny(steps=4, evals=0)
    run = tmp_path / "run"
    written, real = [], train_mod.atomic_write
    monkeypatch.setattr(train_mod, "atomic_write", lambda path, write: written.append(path.name) or real(path, write))
    train(r, run, save_every=2, progress=False, log=lambda *_: None)
    assert "config.json" in written  # written atomically, as the states
    metrics, config = run / "metrics.jsonl", run / "config.json"
    good = config.read_text()
    for bad in ("[]", '{"recipe": "x"}', '{"model": {}, "recipe": [1]}', "{\"model\": {"):
        config.write_text(bad)
        with pytest.raises(ValueError, match=r"config.json is not a run configuration as mixer train writes it"):
            train_mod.launch(r, run, resume=True, save_every=2, progress=False, log=lambda *_: None)
    config.write_text(good)
    metrics.write_bytes(b'{"step": 2}\n[1, 2]\n{"step": 4}\n')
    # More steps: resuming the finished run as it is would change nothing and read nothing.
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a metrics entry .*; delete that line and rerun"):
        train(r.replace(steps=6), run, resume=True, save_every=2, progress=False, log=lambda *_: None)
    metrics.write_bytes(b'{"step": 2}\n{"step": 4, "train_lo\xff')  # a power cut in the middle of an append
    with pytest.warns(UserWarning, match=r"metrics.jsonl: its last line is damaged \(cut short\?\) and was dropped"):
        train(r.replace(steps=6), run, resume=True, save_every=2, progress=False, log=lambda *_: None)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [2, 6, 6]  # train, val
    assert "metrics.jsonl" in written  # trimmed atomically


def test_resume_removes_the_temporaries_of_a_save_that_was_killed(tmp_path: Path) -> None:
    r = tiny(steps=2, evals=0)
    run = tmp_path / "run"
    train(r, run, save_every=2, progress=False, log=lambda *_: None)
    stale = [run / "checkpoints" / ".step-00000004.pt.0123456789ab.tmp.pt", run / ".curves.png.a1b2c3d4e5f6.tmp.png"]
    others = [run / ".notes.tmp", run / "checkpoints" / ".step-00000004.pt.xyz.tmp.pt", run / "keep.0123456789ab.tmp.pt"]
    for p in stale + others:
        p.write_bytes(b"half written")
    train(r.replace(steps=4), run, resume=True, save_every=2, progress=False, log=lambda *_: None)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in others)


class KilledInWorker(torch.utils.data.Dataset):
    """Images whose reading kills the DataLoader worker process."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer does


def test_a_killed_dataloader_worker_is_one_sentence() -> None:
    batches = loader_batches(KilledInWorker(), tiny(workers=1), 4, 1, 0, 2, 0, 1)
    with pytest.raises(ChildProcessError, match=r"A DataLoader worker died \(DataLoader worker \(pid.*; the out-of-memory "
                                                r"killer\?\); the saved training states are kept: add --resume to go on"):
        next(batches)


def test_a_dataloader_worker_killed_in_a_validation_is_one_sentence(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from mlpmixer.data import Source

    monkeypatch.setattr(train_mod, "open_eval_data", lambda *_: Source(KilledInWorker(), [str(i) for i in range(10)], 8))
    with pytest.raises(ChildProcessError, match=r"A DataLoader worker died \(DataLoader worker \(pid.*; the out-of-memory "
                                                r"killer\?\); the saved training states are kept: add --resume to go on"):
        train(tiny(steps=2, evals=1, workers=1, eval_data="elsewhere"), tmp_path / "run", save_every=1, progress=False,
              log=lambda *_: None)
    assert train_mod.latest_state(tmp_path / "run").name == "step-00000001.pt"  # kept, as the sentence says


@pytest.mark.parametrize("where", ["loss_fn", "save_state"])
def test_a_dataloader_worker_killed_during_a_step_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  where: str) -> None:
    """torch's SIGCHLD handler raises a worker's death wherever the training process is when the signal comes: in a
    forward or backward pass (its RuntimeError and traceback), or in a save (said as a failed save), not only where
    the loader is read. One sentence wherever, and --resume goes on from the states kept."""
    import multiprocessing
    import time

    from test_sources import make_folder

    make_folder(tmp_path / "f", {"a": 16, "b": 16})
    real, calls = getattr(train_mod, where), []

    def killing_a_worker(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the third step (loss_fn), or the third save: states 1 and 2 are on disk
            os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)  # as the out-of-memory killer does
            time.sleep(5)  # the handler raises in here, once the signal comes
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, where, killing_a_worker)
    r = tiny(data=str(tmp_path / "f"), model="nano/4", img_size=8, batch_size=4, steps=4, workers=2, holdout=0,
             evals=0)
    with pytest.raises(ChildProcessError, match=r"^A DataLoader worker died \(DataLoader worker \(pid.*; the "
                                                r"out-of-memory killer\?\); the saved training states are kept: add "
                                                r"--resume to go on \(fewer --workers take less memory\).$"):
        train(r, tmp_path / "run", save_every=1, progress=False, log=lambda *_: None)
    assert train_mod.latest_state(tmp_path / "run").name == "step-00000002.pt"
    monkeypatch.setattr(train_mod, where, real)
    files = train(r, tmp_path / "run", resume=True, save_every=1, progress=False, log=lambda *_: None)
    assert files.model.is_file()


def test_a_save_that_fails_for_want_of_space_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            raise RuntimeError("basic_ios::clear: iostream error")  # torch's report of a write on a full disk
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    run = tmp_path / "run"
    with pytest.raises(OSError, match=r"Could not save .*step-00000004.pt \(basic_ios::clear: iostream error\); free "
                                      r"space on its disk .* and rerun with --resume; the last saved state is "
                                      r".*step-00000002.pt\."):
        train(tiny(steps=6, evals=0), run, save_every=2, progress=False, log=lambda *_: None)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002.pt"]  # no temporary left
    monkeypatch.setattr(torch, "save", real)
    import safetensors.torch

    def no_space(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    with pytest.raises(OSError, match=r"Could not save .*model.safetensors \(no space left on the device\); free"):
        train(tiny(steps=6, evals=0), run, resume=True, save_every=2, progress=False, log=lambda *_: None)


def test_sigmoid_head_bias_starts_at_minus_log_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    real = train_mod.make_optimizer

    def spy(model, r):
        seen["bias"] = model.head.bias.detach().clone()
        return real(model, r)

    monkeypatch.setattr(train_mod, "make_optimizer", spy)
    train(tiny(loss="sigmoid", steps=1, evals=0), tmp_path / "s", progress=False, log=lambda *_: None)
    assert torch.allclose(seen["bias"], torch.full((10,), -math.log(10)))
    seen.clear()  # fine-tuning: the new head's weights are zero, its bias the same prior
    train(tiny(loss="sigmoid", steps=1, evals=0), tmp_path / "f", init_from=str(tmp_path / "s"), progress=False,
          log=lambda *_: None)
    assert torch.allclose(seen["bias"], torch.full((10,), -math.log(10)))


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    r = tiny(steps=6, ema=0.9, evals=0, threads=1)  # fixed: the machine's load must not change the sums' order
    full = train(r, tmp_path / "full", save_every=3, progress=False, log=lambda *_: None)
    states = sorted((tmp_path / "full" / "checkpoints").glob("step-*.pt"))
    assert [p.name for p in states] == ["step-00000003.pt", "step-00000006.pt"]
    # A run that stopped after step 3: only its first state exists.
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    (cut / "checkpoints" / states[0].name).write_bytes(states[0].read_bytes())
    train(r, cut, resume=True, save_every=3, progress=False, log=lambda *_: None)
    a, b = load_checkpoint(full.model).state_dict(), load_checkpoint(cut / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(states[1], weights_only=True)
    assert state["step"] == 6 and set(state) == {"model", "optimizer", "step", "ema"}


@pytest.mark.parametrize("layout", ["folder", "shards", "shards without a count"])
def test_resume_with_augmentation_in_the_workers_is_bit_exact(tmp_path: Path, layout: str) -> None:
    """Crops, flips and RandAugment drawn in two DataLoader workers, mixup and stochastic depth in the
    training process: a run resumed mid-epoch ends with the uninterrupted run's weights, bit for bit."""
    from test_sources import make_folder, make_shards

    data = tmp_path / "data"
    if layout == "folder":
        make_folder(data, {"a": 14, "b": 13, "c": 13})
    else:
        make_shards(data, shards=2, per_shard=20, describe=layout == "shards")
        if layout == "shards without a count":
            (data / "dataset.json").write_text(json.dumps({"classes": ["a", "b", "c"]}))
    r = get_recipe("imagenette-s16", data=str(data), model="nano/4", img_size=8, holdout=0, batch_size=8, steps=8,
                   evals=1, workers=2, ema=0.9, threads=1)  # 5 steps an epoch; fixed threads: the same sums
    quiet = dict(progress=False, log=lambda *_: None)
    full = train(r, tmp_path / "full", save_every=3, **quiet)
    # In the middle of the first epoch; without a count, of the second pass over the data (a new shuffle).
    cut = state_copied(full.out, 6 if layout == "shards without a count" else 3, tmp_path / "cut")
    train(r, cut, resume=True, save_every=3, **quiet)
    a, b = load_checkpoint(full.model).state_dict(), load_checkpoint(cut / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    if layout == "folder":  # an image's draws follow from its place in the epoch, not from the worker reading it
        alone = train(r.replace(workers=0), tmp_path / "alone", **quiet)
        c = load_checkpoint(alone.model).state_dict()
        assert all(torch.equal(a[k], c[k]) for k in a)


def test_resuming_with_fewer_steps_than_done_is_refused(tmp_path: Path) -> None:
    """It used to say "resuming at step 4" of a run of 2, train nothing and write the model as if finished."""
    run = tmp_path / "run"
    files = train(tiny(steps=4, evals=0), run, save_every=2, progress=False, log=lambda *_: None)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"step-00000004.pt was saved after step 4, beyond the 2 steps of this "
                                         r"command's run; give --steps 4 or more"):
        train(tiny(steps=2, evals=0), run, resume=True, progress=False, log=lambda *_: None)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    files.model.unlink()  # killed after its last state, before the model: resuming with its own steps writes it
    train(tiny(steps=4, evals=0), run, resume=True, progress=False, log=lambda *_: None)
    assert files.model.is_file()


def test_resuming_a_finished_run_changes_none_of_its_files(tmp_path: Path) -> None:
    """It used to rewrite config.json with the command's settings (here another lr) for steps it never ran."""
    run = tmp_path / "run"
    train(tiny(steps=4, evals=0), run, save_every=2, progress=False, log=lambda *_: None)
    before = {p: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    said = []
    train(tiny(steps=4, evals=0, lr=0.5), run, resume=True, progress=False, log=said.append)
    assert {p: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()} == before
    assert said == [f"{run} finished its 4 steps already; nothing was changed (give more --steps or --epochs to train "
                    "it further)."]


def test_images_per_second_leave_out_validation_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A validation of 2 s after step 10 must not count in the images/s of steps 11-20 (320 images)."""
    import time

    real = train_mod.evaluate

    def slow_evaluate(*args, **kwargs):
        time.sleep(2)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate", slow_evaluate)
    files = train(tiny(steps=20, evals=2), tmp_path / "run", progress=False, log=lambda *_: None)
    rows = [json.loads(line) for line in files.metrics.read_text().splitlines()]
    speed = next(r["img_per_s"] for r in rows if r["step"] == 20 and "img_per_s" in r)
    assert speed > 320 / 2  # counting the validation, 320 images would take more than 2 s


def test_keep_last_n_states(tmp_path: Path) -> None:
    train(tiny(steps=5, evals=0), tmp_path / "k", save_every=1, keep=2, progress=False, log=lambda *_: None)
    assert [p.name for p in sorted((tmp_path / "k" / "checkpoints").glob("*.pt"))] == ["step-00000004.pt", "step-00000005.pt"]


def poison_third_loss(monkeypatch: pytest.MonkeyPatch, value: float) -> list[int]:
    """Multiply the loss of the third call (step 2 of a run without accumulation) by `value`; returns
    the list that counts the calls."""
    real, calls = train_mod.loss_fn, []

    def poisoned(logits, target, r):
        calls.append(1)
        loss = real(logits, target, r)
        return loss * value if len(calls) == 3 else loss

    monkeypatch.setattr(train_mod, "loss_fn", poisoned)
    return calls


def test_nan_loss_stops_and_names_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    poison_third_loss(monkeypatch, float("nan"))
    # The third step's loss comes from the state saved after step 2: that one is moved aside, not named good.
    with pytest.raises(TrainingDiverged, match=r"in step 3 \(counted as the progress bar counts\); the state saved "
                                               r"after step 2, whose weights gave it, was moved aside to "
                                               r".*diverged-step-00000002.pt; the last good checkpoint is "
                                               r".*step-00000001.pt\."):
        train(tiny(steps=6, evals=0), tmp_path / "nan", save_every=1, keep=0, progress=False, log=lambda *_: None)
    assert not (tmp_path / "nan" / "model.safetensors").exists()
    assert (tmp_path / "nan" / "curves.png").stat().st_size > 0  # the curves up to the divergence, to look at
    states = tmp_path / "nan" / "checkpoints"
    assert sorted(p.name for p in states.iterdir()) == ["diverged-step-00000002.pt", "step-00000001.pt"]
    assert train_mod.latest_state(tmp_path / "nan").name == "step-00000001.pt"  # what --resume goes on from


def test_deferred_nan_checks_name_the_first_bad_step_and_save_nothing_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On GPUs the losses are checked only before logging, evaluating or saving (here forced on the CPU)."""
    calls = poison_third_loss(monkeypatch, float("inf"))
    monkeypatch.setattr(train_mod, "_defer_checks", lambda device: True)
    with pytest.raises(TrainingDiverged, match=r"became (inf|nan) in step 3 \(.*\); no checkpoint had been saved yet \(--save-every N"):
        train(tiny(steps=12, evals=0), tmp_path / "nan", save_every=5, progress=False, log=lambda *_: None)
    assert len(calls) == 5  # it ran on to the first save point, then stopped before saving
    assert not (tmp_path / "nan" / "checkpoints").exists() or not any((tmp_path / "nan" / "checkpoints").iterdir())


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    # SGD: its update is linear in the gradient, so summation-order differences stay at rounding level.
    r = tiny(steps=2, evals=0, optimizer="sgd", lr=0.1)
    one = train(r, tmp_path / "one", progress=False, log=lambda *_: None)
    acc = train(r.replace(accum=4), tmp_path / "acc", progress=False, log=lambda *_: None)
    a, b = load_checkpoint(one.model).state_dict(), load_checkpoint(acc.model).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_fast_path_training_follows_the_plain_path(tmp_path: Path) -> None:
    """--fast trains the same parameters through fast.py; in fp32 a few Adam steps end where the plain
    path's do, to rounding. It is an alternative to --compile."""
    r = tiny(steps=3, evals=1)
    plain = train(r, tmp_path / "plain", progress=False, log=lambda *_: None)
    fast = train(r.replace(fast=True), tmp_path / "fast", progress=False, log=lambda *_: None)
    a, b = load_checkpoint(plain.model).state_dict(), load_checkpoint(fast.model).state_dict()
    # Left out: the token-mixing output biases, whose gradient is zero but for rounding (every reader of
    # the stream is a LayerNorm over channels, which cancels a per-token constant): Adam scales that
    # rounding noise up to whole steps, differently in each path.
    compared = [k for k in a if not k.endswith("mlp_tokens.fc2.bias")]
    assert len(compared) > 40
    assert max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in compared) < 1e-4
    assert b["head.weight"].abs().sum() > 0  # it trained: the head starts at zero
    with pytest.raises(ValueError, match="--fast is an alternative to --compile"):
        train(r.replace(fast=True, compile=True), tmp_path / "both", progress=False, log=lambda *_: None)
    assert not (tmp_path / "both").exists()


def test_recipes_are_valid() -> None:
    for name in RECIPES:
        r = get_recipe(name)
        assert r.optimizer in ("adamw", "adam", "sgd") and r.schedule in ("cosine", "linear")
    assert get_recipe("finetune").optimizer == "sgd" and get_recipe("finetune").weight_decay == 0
    with pytest.raises(ValueError, match="Unknown recipe"):
        get_recipe("nope")
    with pytest.raises(ValueError, match="Unknown recipe settings"):
        get_recipe("mnist5k", learning_rate=1)


def test_another_model_is_built_as_its_variant_defines_it() -> None:
    """The default recipe's model_args (gelu) belong to its digits/7: `--model S/16` must give the paper's S/16."""
    from mlpmixer.variants import variant_config

    assert get_recipe("mnist5k").model_args == {"gelu": "exact"}
    assert get_recipe("mnist5k", model="S/16").model_args == {}
    assert get_recipe("mnist5k", model="Mixer-digits/7").model_args == {"gelu": "exact"}  # the same model
    assert get_recipe("mnist5k", model="S/16", model_args={"gelu": "exact"}).model_args == {"gelu": "exact"}
    r = get_recipe("mnist5k", model="S/16")
    assert variant_config(r.model, **r.model_args) == variant_config("S/16")
    with pytest.raises(ValueError, match="Unknown Mixer variant 'Q/3'"):
        get_recipe("mnist5k", model="Q/3")


def test_autoaugment_and_randaugment_replace_each_other() -> None:
    """`--autoaugment cifar10` on a recipe with RandAugment trains with AutoAugment alone, and the other way
    round; both given at once are refused."""
    assert get_recipe("cifar10-nano").randaugment == 9
    r = get_recipe("cifar10-nano", autoaugment="cifar10")
    assert (r.autoaugment, r.randaugment) == ("cifar10", None)
    saved = r.to_dict()  # as a run's config.json holds it
    assert get_recipe("cifar10-nano", **saved) == r
    assert get_recipe("cifar10-nano", **{**saved, "randaugment": 5, "autoaugment": None}).randaugment == 5
    with pytest.raises(ValueError, match=r"--randaugment and --autoaugment \(randaugment and autoaugment in a config file\) are alternatives"):
        get_recipe("cifar10-nano", randaugment=5, autoaugment="svhn")
    with pytest.raises(ValueError, match="--autoaugment must be one of imagenet, cifar10, svhn, not 'cifar100'."):
        get_recipe("cifar10-nano", autoaugment="cifar100")


ROOT = Path(__file__).resolve().parents[1]


def test_resume_after_sigkill_is_bit_exact(tmp_path: Path, child_env: dict) -> None:
    import subprocess
    import sys
    import time

    # One process each time: a resumed run equals the interrupted one bit for bit with the same count.
    # Fixed threads: the interrupted and the uninterrupted run must sum in the same order. (A resumed run
    # takes its process and thread counts from the run it resumes.)
    args = ["train", "--steps", "40", "--batch-size", "32", "--save-every", "4", "--quiet", "--processes", "1",
            "--threads", "1"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mlpmixer", *args, "--out", str(killed)], env=child_env, cwd=ROOT)
    deadline = time.time() + 300
    while not list((killed / "checkpoints").glob("step-*0008.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    assert not (killed / "model.safetensors").exists(), "the run finished before it could be killed"
    from mlpmixer.cli import main

    assert main([*args, "--out", str(killed), "--resume"]) == 0
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    a = load_checkpoint(killed).state_dict()
    b = load_checkpoint(tmp_path / "whole").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_follow_one_with_the_same_global_batch(tmp_path: Path, child_env: dict) -> None:
    import subprocess
    import sys

    # SGD, whose update is linear in the gradient: Adam's first steps divide tiny gradients by their own
    # size, which turns rounding differences of the all-reduce into visible ones. Augmentation stays on:
    # each rank takes its slice of the same augmented global batch.
    common = ["train", "--steps", "3", "--batch-size", "32", "--quiet", "--optimizer", "sgd", "--lr", "0.1"]
    for run, flags in (("ddp", []), ("ddp-fast", ["--fast"])):  # --fast: DDP wraps the fast path
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29517", "-m", "mlpmixer", *common, *flags, "--out", str(tmp_path / run)], env=child_env, cwd=ROOT,
                       check=True, timeout=600)
    from mlpmixer.cli import main

    assert main([*common, "--processes", "1", "--out", str(tmp_path / "one")]) == 0
    # The same through `mixer train --processes 2`, which forks its own second process.
    assert main([*common, "--processes", "2", "--out", str(tmp_path / "forked")]) == 0
    b = load_checkpoint(tmp_path / "one").state_dict()
    for run in ("ddp", "ddp-fast", "forked"):
        a = load_checkpoint(tmp_path / run).state_dict()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
        assert json.loads((tmp_path / run / "config.json").read_text())["world_size"] == 2


def rank_reports(args: list[str], port: int, env: dict, folder: Path) -> tuple[str, list[dict]]:
    """Run `mixer ARGS` as 2 torchrun ranks of tests/rank_report.py, which report into `folder`: their stderr,
    and each rank's report in rank order (none where the run failed)."""
    import subprocess
    import sys

    folder.mkdir()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(ROOT / "tests" / "rank_report.py"), *args],
                          env={**env, "RANK_REPORTS": str(folder)}, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    reports = [json.loads(path.read_text()) for path in sorted(folder.glob("rank-*.json"))]
    return done.stderr, reports if done.returncode == 0 else []


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads a process's threads from Linux's /proc")
def test_ranks_end_with_the_process_group_gone(tmp_path: Path, child_env: dict) -> None:
    """destroy_process_group ends gloo's threads: left running, one can abort the process as the interpreter
    exits (pytorch#190489), after the run succeeded. They stayed when torch._dynamo, which DDP imports, was
    first imported after init_process_group."""
    stderr, reports = rank_reports(["train", "--steps", "2", "--batch-size", "32", "--quiet", "--out",
                                    str(tmp_path / "run")], port=29518, env=child_env, folder=tmp_path / "reports")
    assert [report["rank"] for report in reports] == [0, 1], stderr[-3000:]
    for report in reports:
        assert not [name for name in report["threads"] if "gloo" in name], report


@pytest.mark.skipif(torch.__version__ < (2, 7) and not torch.cuda.is_available(),
                    reason="FSDP2 runs on the CPU from torch 2.7 (test_fsdp_on_the_cpu_needs_torch_2_7)")
def test_fsdp_ranks_leave_together_after_rank_0s_files(tmp_path: Path, child_env: dict) -> None:
    """FSDP's process group outlives destroy_process_group (DTensor's caches hold it), and so do gloo's threads:
    each rank leaves only after rank 0 wrote its files, long after those threads last held the tensors that
    `_gather` sent, which, let go as the interpreter exits, would abort the process."""
    run = tmp_path / "run"
    stderr, reports = rank_reports(["train", "--steps", "2", "--batch-size", "32", "--quiet", "--fsdp", "--out",
                                    str(run)], port=29519, env=child_env, folder=tmp_path / "reports")
    if "does not average where FSDP asks it to" in stderr:  # refused: test_fsdp.py
        pytest.skip(f"the gloo backend of torch {torch.__version__} sums where FSDP averages (pytorch#162338)")
    assert [report["rank"] for report in reports] == [0, 1], stderr[-3000:]
    written = max((run / name).stat().st_mtime for name in ("model.safetensors", "curves.png"))
    assert all(report["returned"] >= written for report in reports), (reports, written)


def _torchrun(cwd: Path, launcher: list[str], args: list[str], log: Path, env: dict):
    """A torchrun launcher started in `cwd`, its output going to `log` (pipes could fill while another waits)."""
    import subprocess
    import sys

    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "mlpmixer", *args],
                                env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)


def test_two_machines_meet_through_torchruns_rendezvous(tmp_path: Path, child_env: dict) -> None:
    """docs/training.md's multi-machine command, with two launchers standing for two machines, each in its
    own folder (its own file system for the relative --out) and one process each: the run follows the
    one-process run, and only the machine torchrun gave global rank 0 writes it. Resuming from there stops
    both, each machine saying once which rank found no state."""
    machines = [tmp_path / "a", tmp_path / "b"]
    for folder in machines:
        folder.mkdir()

    def on_both(args: list[str], job: str, port: int) -> list[tuple[int, str]]:
        launcher = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                    "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", job]
        procs = [_torchrun(folder, launcher, args, tmp_path / f"{folder.name}-{job}.log", child_env)
                 for folder in machines]
        return [(p.wait(timeout=600), (tmp_path / f"{folder.name}-{job}.log").read_text())
                for p, folder in zip(procs, machines)]

    common = ["train", "--steps", "3", "--batch-size", "32", "--quiet", "--optimizer", "sgd", "--lr", "0.1",
              "--save-every", "3"]
    done = on_both([*common, "--out", "runs/x"], "train", 29541)
    assert [code for code, _ in done] == [0, 0], done
    written = [folder / "runs" / "x" for folder in machines if (folder / "runs").exists()]
    assert len(written) == 1
    assert json.loads((written[0] / "config.json").read_text())["world_size"] == 2
    from mlpmixer.cli import main

    assert main([*common, "--processes", "1", "--out", str(tmp_path / "one")]) == 0
    a, b = load_checkpoint(written[0]).state_dict(), load_checkpoint(tmp_path / "one").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

    for code, err in on_both([*common, "--out", "runs/x", "--resume"], "resume", 29542):
        assert code != 0
        assert err.count("mixer train: error: On rank ") == 1 and " of 2 (" in err, err[-3000:]
        assert "has no saved training state" in err and "file system they share" in err
        assert str(Path("mlpmixer") / "train.py") not in err, err[-3000:]  # no traceback through our code


def _on_two_ranks(args: list[str], port: int, tmp_path: Path, env: dict, launcher: tuple[str, ...] = ()) -> str:
    """The output of `mixer ARGS` under torchrun (with `launcher` flags) in 2 processes, which must fail."""
    proc = _torchrun(ROOT, ["--nproc_per_node", "2", "--master_port", str(port), *launcher], args,
                     tmp_path / f"{port}.log", env)
    code, err = proc.wait(timeout=600), (tmp_path / f"{port}.log").read_text()
    assert code != 0, err[-3000:]
    assert str(Path("mlpmixer") / "train.py") not in err, err[-3000:]  # no traceback through our code, on any rank
    return err


def test_an_error_every_rank_meets_is_printed_once(tmp_path: Path, child_env: dict) -> None:
    common = ["train", "--quiet", "--out", str(tmp_path / "r")]
    # In the set-up, before the start line where the ranks meet.
    err = _on_two_ranks([*common, "--steps", "1", "--batch-size", "33"], 29543, tmp_path, child_env)
    assert err.count("mixer train: error: The batch size 33 must divide") == 1, err[-3000:]
    # After it, where each rank stops on its own: found by the first batch.
    err = _on_two_ranks([*common, "--steps", "1", "--batch-size", "10000"], 29545, tmp_path, child_env)
    assert err.count("mixer train: error: The batch size 10000 is larger than the 4750 training images") == 1, \
        err[-3000:]


def test_an_error_of_rank_0_alone_stops_the_other_ranks_without_a_word(tmp_path: Path, child_env: dict) -> None:
    """Rank 0 evaluates alone: validation images that are all undecodable stop it after the start line, while
    rank 1 waits for it in the next step's gradient all-reduce, which then breaks."""
    from test_sources import make_folder

    make_folder(tmp_path / "bad", {str(i): 1 for i in range(10)}, bad=tuple(range(10)))
    args = ["train", "--quiet", "--steps", "4", "--evals", "2", "--batch-size", "32", "--workers", "0",
            "--eval-data", str(tmp_path / "bad"), "--out", str(tmp_path / "r")]
    err = _on_two_ranks(args, 29546, tmp_path, child_env)
    assert err.count("mixer train: error: ") == 1 and f"10 of 10 images (100.0%) of {tmp_path / 'bad'} could not be decoded" in err, \
        err[-3000:]


def test_a_malformed_metrics_line_on_resume_stops_every_rank_with_one_sentence(tmp_path: Path,
                                                                                child_env: dict) -> None:
    from mlpmixer.cli import main

    args = ["train", "--steps", "2", "--batch-size", "32", "--evals", "0", "--save-every", "2", "--quiet",
            "--out", str(tmp_path / "r")]
    assert main([*args, "--processes", "1"]) == 0
    (tmp_path / "r" / "metrics.jsonl").write_bytes(b'{"step": 1}\n[1, 2]\n{"step": 2}\n')
    config = (tmp_path / "r" / "config.json").read_bytes()
    # Two steps more: a resume of the finished run as it is would change nothing and read nothing.
    err = _on_two_ranks([*args, "--resume", "--steps", "4"], 29547, tmp_path, child_env)
    assert err.count("mixer train: error: ") == 1 and "metrics.jsonl line 2 is not a metrics entry" in err, \
        err[-3000:]
    # Found in the set-up, before the ranks meet: nothing was written (a resumed run rewrites its config.json after).
    assert (tmp_path / "r" / "config.json").read_bytes() == config


def test_every_option_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 autocast, gradient checkpointing, clipping, accumulation, EMA, sigmoid loss, linear decay, Adam,
    stochastic depth: a short run with all of them writes a finite model, and its training blocks ran under
    bf16 autocast, each through a checkpoint."""
    import mlpmixer.model as model_mod

    seen, checkpointed = [], []
    block_forward, checkpoint = model_mod.MixerBlock.forward, model_mod.checkpoint

    def recording_forward(block, x):
        if block.training:
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return block_forward(block, x)

    def recording_checkpoint(fn, *args, **kwargs):
        checkpointed.append(fn)
        return checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(model_mod.MixerBlock, "forward", recording_forward)
    monkeypatch.setattr(model_mod, "checkpoint", recording_checkpoint)
    r = tiny(steps=3, bf16=True, grad_checkpointing=True, clip=1.0, accum=2, ema=0.9, loss="sigmoid",
             schedule="linear", warmup=1, optimizer="adam", drop_path=0.1, evals=1)
    files = train(r, tmp_path / "all", progress=False, log=lambda *_: None)
    model = load_checkpoint(files.model)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert model.config.drop_path_rate == 0.1
    blocks = model.config.num_blocks * 3 * 2  # blocks × steps × micro-batches
    assert len(checkpointed) == blocks and set(seen) == {(True, torch.bfloat16)} and len(seen) >= blocks


def test_ema_weights_follow_the_live_ones_and_are_what_is_saved(tmp_path: Path) -> None:
    # An evaluation after every step swaps the EMA weights in and the live ones back between updates.
    files = train(tiny(steps=3, ema=0.5, evals=3), tmp_path / "ema", save_every=1, progress=False, log=lambda *_: None)
    first, second = (torch.load(tmp_path / "ema" / "checkpoints" / f"step-0000000{i}.pt", weights_only=True)
                     for i in (2, 3))
    decay = min(0.5, 3 / 12)  # the warm-up (1 + step) / (10 + step) at step 2 is below 0.5
    saved = load_checkpoint(files.model).state_dict()
    for k, live in second["model"].items():
        expected = first["ema"][k] + (live - first["ema"][k]) * (1 - decay)
        torch.testing.assert_close(second["ema"][k], expected)
        assert torch.equal(saved[k], second["ema"][k])
    assert any(not torch.equal(second["ema"][k], v) for k, v in second["model"].items())


def test_running_out_of_gpu_memory_is_one_sentence_saying_what_to_change(tmp_path: Path, monkeypatch) -> None:
    from mlpmixer.model import MlpMixer

    def too_big(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(MlpMixer, "forward", too_big)
    with pytest.raises(train_mod.OutOfMemory, match=r"micro-batches of 16 images per process; raise --accum "
                                                      r"\(--accum 4 keeps the batch of 32"):
        train(tiny(steps=2, batch_size=32, accum=2), tmp_path / "run", progress=False, log=lambda *_: None)


def test_paper_recipes_follow_spec_section_4() -> None:
    for name in ("paper-b-in1k", "paper-l-in1k", "paper-b-in21k", "paper-l-in21k"):
        # Table 4's m of 15, 10 and 20 on big_vision's scale: torchvision's strongest, 30, for each.
        assert get_recipe(name).randaugment == 30
    for name in [n for n in RECIPES if n.startswith("paper-")]:
        assert get_recipe(name).loss == "sigmoid"  # big_vision's recipe, head bias at -log(classes)
    assert get_recipe("paper-l-jft").epochs == 7  # SPEC §3's L results
    # The fine-tuning warm-up is 5% of the run: the official 500 of 10k steps, and a 500-step Pets
    # run still decays to zero (500 fixed steps would end at the peak).
    finetune = get_recipe("finetune")
    assert lr_at(499, 10_000, finetune) == finetune.lr
    assert lr_at(24, 500, finetune) == finetune.lr and lr_at(499, 500, finetune) < 1e-4 * finetune.lr


def test_a_warmup_as_long_as_the_run_is_named(tmp_path: Path) -> None:
    said: list[str] = []
    train(get_recipe("mnist5k", steps=2, batch_size=8, warmup=10), tmp_path / "run", progress=False, log=said.append)
    assert any("the warm-up of 10 steps covers the whole run of 2" in line for line in said)


def test_a_nan_loss_of_every_rank_is_said_once_as_rank_0_says_it(tmp_path: Path, child_env: dict) -> None:
    """Rank 1 said its own sentence too, naming as the last good checkpoint the state that rank 0 moved aside."""
    args = ["train", "--quiet", "--steps", "4", "--batch-size", "32", "--evals", "0", "--optimizer", "sgd",
            "--lr", "1e30", "--warmup", "0", "--save-every", "1", "--out", str(tmp_path / "r")]
    err = _on_two_ranks(args, 29548, tmp_path, child_env)
    assert err.count("mixer train: error: ") == 1 and "was moved aside to" in err, err[-3000:]


def test_a_killed_rank_stops_the_others_with_one_sentence(tmp_path: Path, child_env: dict) -> None:
    """Rank 0 printed gloo's "Connection closed by peer" traceback when rank 1 was killed (SIGKILL)."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(  # rank 1 kills itself in its third step
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import signal\n"
        "    import mlpmixer.train as t\n"
        "    real, calls = t.reseed, []\n"
        "    def reseed(seed):\n"
        "        calls.append(seed)\n"
        "        if len(calls) == 3:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        real(seed)\n"
        "    t.reseed = reseed\n")
    env = {**child_env, "PYTHONPATH": f"{tmp_path / 'inject'}{os.pathsep}{child_env['PYTHONPATH']}"}
    args = ["train", "--quiet", "--steps", "6", "--batch-size", "32", "--evals", "0", "--out", str(tmp_path / "r")]
    # torchrun stops the other workers once its monitor sees one dead (every 0.1 s by default): given 10 s, rank 0
    # meets the broken all-reduce first, and says so.
    err = _on_two_ranks(args, 29549, tmp_path, env, launcher=("--monitor-interval", "10"))
    assert err.count("mixer train: error: Another process of the run is gone (killed") == 1, err[-3000:]
