"""Batch augmentation on the device: torchvision's RandAugment operations and crop rules, per-image draws,
each process's share, reading a dataset into memory, and training with it (resumed bit for bit)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from mlpmixer import load_checkpoint
from mlpmixer.batch_augment import OPERATIONS, RANDAUGMENT_SPACE, BatchAugment, crop_boxes
from mlpmixer.data import Source
from mlpmixer.recipes import get_recipe
from mlpmixer.sources import read_into_memory
from mlpmixer.train import train
from test_sources import encode, make_folder, make_shards, sample_id


def images(n: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def randaugment(aug: BatchAugment, x: torch.Tensor, ops: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """RandAugment's operations `ops` (indices into its space) at the level aug.m."""
    return aug.operations(x, ops, torch.full_like(ops, aug.m), negative)


@pytest.mark.parametrize("name", RANDAUGMENT_SPACE)
@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("m", [5, 15])
def test_each_randaugment_operation_is_torchvisions(name: str, negative: bool, m: int) -> None:
    """Every row that drew an operation gets exactly what torchvision's RandAugment does with it (its
    per-operation method is private; this test is where a change of it would show)."""
    op_id = RANDAUGMENT_SPACE.index(name)
    _, levels, signed = OPERATIONS[name]
    x = images(6, size=20)
    ops = torch.full((6, 1), op_id)
    ours = randaugment(BatchAugment(20, randaugment_m=m), x, ops, torch.full((6, 1), negative))
    table = levels(31, 20, 20)
    value = float(table[m]) if table is not None else 0.0
    value = -value if negative and signed else value
    reference = v2.RandAugment(num_ops=1, magnitude=m)
    expected = torch.stack([reference._apply_image_or_video_transform(
        image, name, value, v2.InterpolationMode.NEAREST, {type(image): None}) for image in x])
    assert torch.equal(ours, expected)


def test_randaugment_space_is_torchvisions() -> None:
    assert RANDAUGMENT_SPACE == list(v2.RandAugment._AUGMENTATION_SPACE)


def test_rows_get_their_own_operations() -> None:
    x = images(4)
    ops = torch.tensor([[0, 0], [RANDAUGMENT_SPACE.index("Solarize"), 0], [0, 0], [0, 0]])
    out = randaugment(BatchAugment(16, randaugment_m=30), x, ops, torch.zeros(4, 2, dtype=torch.bool))
    assert torch.equal(out[[0, 2, 3]], x[[0, 2, 3]])  # Identity twice
    assert torch.equal(out[1], F.solarize(x[1], threshold=0.0))


@pytest.mark.parametrize("policy", ["imagenet", "cifar10", "svhn"])
def test_autoaugment_is_torchvisions(policy: str) -> None:
    """Each image gets what v2.AutoAugment gives it: torchvision's own random choices for the image,
    replayed from the same seed in its order (sub-policy, then for each step whether it runs and its
    sign), are carried out by ours. This also checks the policy tables taken from torchvision."""
    x = images(60, size=20)
    aug = BatchAugment(20, autoaugment=policy)
    reference = v2.AutoAugment(v2.AutoAugmentPolicy(policy))
    expected, ops, levels, negative = [], [], [], []
    for i, image in enumerate(x):
        torch.manual_seed(i)
        expected.append(reference(image))
        torch.manual_seed(i)
        pair = reference._policies[int(torch.randint(len(reference._policies), ()))]
        row = []
        for name, chance, level in pair:
            taken = bool(torch.rand(()) <= chance)
            sign = taken and OPERATIONS[name][2] and bool(torch.rand(()) <= 0.5)
            row.append((list(OPERATIONS).index(name) if taken else -1, level or 0, sign))
        ops.append([r[0] for r in row]), levels.append([r[1] for r in row]), negative.append([r[2] for r in row])
    ours = aug.operations(x, torch.tensor(ops), torch.tensor(levels), torch.tensor(negative))
    assert torch.equal(ours, torch.stack(expected))
    assert (torch.tensor(ops) >= 0).sum() > 40  # most steps of these sub-policies ran


def test_autoaugment_draws_sub_policies_and_steps_at_their_rates() -> None:
    aug = BatchAugment(16, autoaugment="cifar10")
    op_ids, chance, level = aug.policy
    draws = aug.draw(50_000, 16, 16, torch.Generator().manual_seed(0))
    # Each image's steps that ran are those of one sub-policy, at its levels.
    same = (op_ids == draws.ops.unsqueeze(1)) & (level == draws.levels.unsqueeze(1))  # (images, 25, 2)
    assert (same | (draws.ops < 0).unsqueeze(1)).all(2).any(1).all()
    # Each sub-policy is drawn 1/25 of the time and each step taken with its probability: only
    # sub-policy 0 starts with Invert (at 0.1), and TranslateY at level 9 starts 21 (0.9) and 24 (0.7).
    ops = list(OPERATIONS)
    assert (draws.ops[:, 0] == ops.index("Invert")).float().mean() == pytest.approx(0.1 / 25, abs=0.001)
    assert ((draws.ops[:, 0] == ops.index("TranslateY")) & (draws.levels[:, 0] == 9)).float().mean() \
        == pytest.approx(1.6 / 25, abs=0.004)


def test_autoaugment_in_the_workers_is_torchvisions() -> None:
    from mlpmixer.transforms import train_transform

    t = train_transform(16, crop_area=(1.0, 1.0), flip=False, autoaugment="svhn")
    assert any(isinstance(step, v2.AutoAugment) and step.policy == v2.AutoAugmentPolicy.SVHN for step in t.transforms)
    assert t(images(1)[0]).shape == (3, 16, 16)


def test_crop_boxes_follow_random_resized_crop() -> None:
    g = torch.Generator().manual_seed(0)
    boxes = crop_boxes(2000, 24, 40, (0.1, 0.8), g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 40).all() and (boxes[:, 3] <= 24).all()
    area = w * h / (24 * 40)
    assert area.min() > 0.08 and area.max() < 0.85  # the range, give or take the rounding of sides
    assert (w / h).min() > 0.6 and (w / h).max() < 1.6
    assert len(set(map(tuple, boxes.tolist()))) > 1500  # drawn per image (integer boxes collide at times)
    # No try can fit a square-ish box of the whole area into a 4×40 strip: torchvision's fallback is
    # the central crop clamped to the largest ratio, 4 high and round(4 × 4/3) = 5 wide.
    strip = crop_boxes(3, 4, 40, (1.0, 1.0), g)
    assert strip.tolist() == [[17.0, 0.0, 22.0, 4.0]] * 3


def test_the_whole_image_unflipped_is_unchanged_and_flips_mirror() -> None:
    x = images()
    g = torch.Generator().manual_seed(1)
    out = BatchAugment(16, crop_area=(1.0, 1.0), flip=False)(x, g)
    assert torch.equal(((out + 1) * 127.5).round().to(torch.uint8), x)
    assert out.dtype == torch.float32 and out.min() >= -1 and out.max() <= 1
    flipped = BatchAugment(16, crop_area=(1.0, 1.0))(x, torch.Generator().manual_seed(1))
    pixels = ((flipped + 1) * 127.5).round().to(torch.uint8)
    mirrored = torch.tensor([torch.equal(p, i.flip(-1)) for p, i in zip(pixels, x)])
    kept = torch.tensor([torch.equal(p, i) for p, i in zip(pixels, x)])
    assert (mirrored | kept).all() and mirrored.any() and kept.any()


def test_crops_resize_as_torchvision_inside_the_box() -> None:
    """Enlarging crops equal torchvision's resized_crop (bilinear) within rounding, except on the box's
    edge, where roi_align reads the image just outside the box and torchvision repeats the edge pixel."""
    x = images(32, size=32)
    aug = BatchAugment(32, crop_area=(0.3, 1.0))
    boxes = crop_boxes(32, 32, 32, (0.3, 1.0), torch.Generator().manual_seed(2))
    ours = aug.crop(x, boxes)
    left, top, right, bottom = boxes.int().T.tolist()
    expected = torch.stack([F.resized_crop(image, t, l, b - t, r - l, [32, 32], antialias=True)
                            for image, l, t, r, b in zip(x, left, top, right, bottom)])
    assert (ours.int() - expected.int())[..., 1:-1, 1:-1].abs().max() <= 1


def test_a_share_of_rows_is_augmented_as_in_the_whole_batch() -> None:
    x = images(10)
    aug = BatchAugment(12, crop_area=(0.2, 1.0), randaugment_m=12)
    whole = aug(x, torch.Generator().manual_seed(3))
    rows = torch.tensor([1, 4, 7])
    assert torch.equal(aug(x, torch.Generator().manual_seed(3), rows=rows), whole[rows])
    assert not torch.equal(aug(x, torch.Generator().manual_seed(4)), whole)


@pytest.mark.parametrize("size", [16, 20])
def test_pad_crop_is_torchvisions_pad_then_crop(size: int) -> None:
    """Each image: resized to img_size if needed, padded with zeros, and the box at its drawn corner
    copied exactly, as v2.RandomCrop(img_size, padding=pad) does for that corner."""
    x = images(300, size=size)
    aug = BatchAugment(16, flip=False, pad=3)
    draws = aug.draw(len(x), size, size, torch.Generator().manual_seed(0))
    out = aug.apply(x, draws)
    left, top = draws.boxes[:, 0].long(), draws.boxes[:, 1].long()
    assert set(left.tolist()) == set(top.tolist()) == set(range(7))  # every offset 0..2·pad occurs
    resized = F.resize(x, [16, 16], antialias=True) if size != 16 else x
    padded = F.pad(resized, [3])
    expected = torch.stack([F.crop(padded[i], int(top[i]), int(left[i]), 16, 16) for i in range(len(x))])
    assert torch.equal(out, expected.float() / 127.5 - 1)


def test_bad_settings_are_one_sentence() -> None:
    with pytest.raises(ValueError, match="crop area"):
        BatchAugment(16, crop_area=(0.5, 0.2))
    with pytest.raises(ValueError, match="magnitude must be 0 to 30"):
        BatchAugment(16, randaugment_m=31)
    with pytest.raises(ValueError, match="padding"):
        BatchAugment(16, pad=-1)
    with pytest.raises(ValueError, match="alternatives"):
        BatchAugment(16, randaugment_m=9, autoaugment="cifar10")
    with pytest.raises(ValueError, match="Unknown AutoAugment policy 'cifar100'; choose one of imagenet, cifar10, svhn"):
        BatchAugment(16, autoaugment="cifar100")


def test_read_into_memory_reads_every_image_in_every_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_shards(tmp_path / "shards", shards=3, per_shard=40, bad=(4,))  # 1 bad image of 120: under 1%
    monkeypatch.setenv("RANK", "1")  # a second process of two still reads all the shards
    monkeypatch.setenv("WORLD_SIZE", "2")
    loaders = []
    real_loader = torch.utils.data.DataLoader
    monkeypatch.setattr(torch.utils.data, "DataLoader", lambda *a, **k: loaders.append(k) or real_loader(*a, **k))
    with pytest.warns(UserWarning, match="Skipped 1 of 120 images"):
        data = read_into_memory(str(tmp_path / "shards"), "train", 0.0, 0, in_chans=3, workers=5, progress=False)
    assert loaders[0]["num_workers"] == 3  # one reader per shard: more would each read every shard
    assert data.bad_samples.bad == 1  # what training logs in metrics.jsonl
    ids = sorted(sample_id(image) for image in data.images)
    assert ids == [i for i in range(120) if i != 4] and data.images.dtype == torch.uint8
    assert data.images.shape == (119, 3, 8, 8) and data.class_names == ["class0", "class1", "class2"]
    assert all(int(label) == sample_id(image) % 3 for image, label in zip(data.images, data.labels))
    with pytest.warns(UserWarning) as record:
        grey = read_into_memory(str(tmp_path / "shards"), "train", 0.0, 0, in_chans=1, workers=0, progress=False)
    messages = [str(w.message) for w in record]
    assert any("Skipping" in m and "sample00004" in m for m in messages)  # each bad image is named too
    assert any("Skipped 1 of 120" in m for m in messages)
    assert grey.images.shape == (119, 1, 8, 8)


def test_a_worker_killed_while_reading_into_memory_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    from test_train import KilledInWorker

    import mlpmixer.sources as sources

    monkeypatch.setattr(sources, "open_folder_or_shards", lambda *_, **__: Source(KilledInWorker(), ["a"], 8))
    with pytest.raises(ChildProcessError, match=r"A DataLoader worker died .*; rerun the command \(fewer --workers"):
        read_into_memory("elsewhere", "train", 0.0, 0, in_chans=3, workers=1, progress=False)


def test_a_holdout_is_read_into_memory_without_counting_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlpmixer.sources as sources

    make_shards(tmp_path / "shards", shards=2, per_shard=50)
    counted = sources.open_folder_or_shards(str(tmp_path / "shards"), "train", 0.2, 3, None).num_examples

    def no_scan(*args):
        raise AssertionError("the shards were scanned")

    monkeypatch.setattr(sources, "_scan", no_scan)
    data = read_into_memory(str(tmp_path / "shards"), "train", 0.2, 3, in_chans=3, workers=0, progress=False)
    ids = {sample_id(image) for image in data.images}
    assert len(ids) == len(data) == counted
    assert ids == {i for i in range(100) if not sources.in_holdout(f"sample{i:05d}", 0.2, 3)}


def test_images_of_several_sizes_cannot_be_held_as_one(tmp_path: Path) -> None:
    make_folder(tmp_path / "data", {"a": 2, "b": 2})
    (tmp_path / "data" / "b" / "big.png").write_bytes(encode(9, size=12))
    with pytest.raises(ValueError, match=r"2 sizes \(8×8, 12×12\).*--augment-on workers"):
        read_into_memory(str(tmp_path / "data"), "train", 0.0, 0, in_chans=3, workers=0, progress=False)


@pytest.mark.parametrize("augmentation", [{}, {"autoaugment": "cifar10"}])
def test_training_with_device_augmentation_resumes_bit_exact(tmp_path: Path, augmentation: dict) -> None:
    from test_train import state_copied

    make_shards(tmp_path / "shards", shards=2, per_shard=40, classes=4)
    # Fixed threads: left to the machine's load, the two runs could sum in different orders.
    r = get_recipe("cifar10-nano", data=str(tmp_path / "shards"), img_size=8, model="nano/4", holdout=0.1,
                   batch_size=16, steps=4, evals=1, workers=0, ema=0.9, threads=1, **augmentation)
    assert r.augment_on == "device"
    quiet = dict(progress=False, log=lambda *_: None)
    full = train(r, tmp_path / "full", save_every=2, **quiet)
    cut = state_copied(full.out, 2, tmp_path / "cut")
    train(r, cut, resume=True, save_every=2, **quiet)
    a, b = load_checkpoint(full.model).state_dict(), load_checkpoint(cut / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_checkpoint(full.model).class_names == ["class0", "class1", "class2", "class3"]
    assert math.isfinite(a["head.weight"].abs().sum().item())


def test_autoaugment_runs_in_the_workers_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    policies: list[v2.AutoAugmentPolicy] = []
    real = v2.AutoAugment.forward
    monkeypatch.setattr(v2.AutoAugment, "forward", lambda self, *a: policies.append(self.policy) or real(self, *a))
    make_shards(tmp_path / "shards", shards=1, per_shard=16, classes=2)
    r = get_recipe("cifar10-nano", data=str(tmp_path / "shards"), img_size=8, model="nano/4", holdout=0.0,
                   batch_size=8, steps=1, evals=0, workers=0, augment_on="workers", autoaugment="svhn")
    train(r, tmp_path / "run", progress=False, log=lambda *_: None)
    assert policies and set(policies) == {v2.AutoAugmentPolicy.SVHN}


def test_device_runs_validate_on_the_holdout_held_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --augment-on device the hold-out is decoded once, like the training images, and scored
    exactly as through the shards' readers."""
    from mlpmixer import sources
    from mlpmixer.evaluate import evaluate
    from mlpmixer.transforms import eval_transform

    make_shards(tmp_path / "shards", shards=2, per_shard=40, classes=4)
    r = get_recipe("cifar10-nano", data=str(tmp_path / "shards"), img_size=8, model="nano/4", holdout=0.25,
                   batch_size=16, steps=4, evals=2, workers=0, ema=0.0)
    passes = []
    real_iter = sources.ShardDataset.__iter__
    monkeypatch.setattr(sources.ShardDataset, "__iter__", lambda self: passes.append(self.split) or real_iter(self))
    files = train(r, tmp_path / "run", progress=False, log=lambda *_: None)
    assert passes == ["train", "val"]  # each side read once, into memory; the two evaluations read no shard
    rows = [json.loads(line) for line in files.metrics.read_text().splitlines()]
    last = [row for row in rows if "val_top1" in row][-1]
    held = sources.open_folder_or_shards(str(tmp_path / "shards"), "val", 0.25, r.seed, eval_transform(8, 3))
    assert last["val_n"] == held.num_examples > 0
    m = evaluate(load_checkpoint(files.model), held, workers=0)
    assert last["val_top1"] == m["top1"] and last["val_loss"] == pytest.approx(m["loss"], rel=1e-6)


def test_each_process_gets_its_share_of_the_one_process_batches() -> None:
    """Several steps are augmented in one call; every step still equals its one-process batch, sliced."""
    from mlpmixer.data import TensorData
    from mlpmixer.train import tensor_batches

    data = TensorData(images(40, size=12), torch.arange(40) % 4, ["a", "b", "c", "d"])
    r = get_recipe("cifar10-nano", seed=5)
    aug = BatchAugment(8, (0.3, 1.0), True, 9)

    def steps(start: int, rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batches = tensor_batches(data, r, 8, 3, 8, 1, start, rank, world, augment=aug, device=torch.device("cpu"))
        return [next(batches)[0] for _ in range(7)]  # 5 steps an epoch: into the second epoch

    one, ranks = steps(0, 0, 1), [steps(0, rank, 2) for rank in (0, 1)]
    for step, (x, y) in enumerate(one):
        for rank in (0, 1):
            assert torch.equal(ranks[rank][step][0], x[rank::2]) and torch.equal(ranks[rank][step][1], y[rank::2])
    assert torch.equal(steps(3, 0, 1)[0][0], one[3][0])  # starting mid-way (a resumed run) changes nothing
    assert not torch.equal(one[0][0], one[5][0])
