"""Preprocessing: sizes, the [-1, 1] range, evaluation modes, channel conversion, MixUp/CutMix."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from mlpmixer.transforms import eval_transform, mixup_cutmix, train_transform


def _image(channels: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (channels, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("in_chans, image_chans", [(3, 3), (3, 1), (1, 3), (1, 1)])
def test_train_transform_shape_range_and_channels(in_chans: int, image_chans: int) -> None:
    out = train_transform(32, in_chans, randaugment_m=15)(_image(image_chans, 50, 70))
    assert out.shape == (in_chans, 32, 32)
    assert out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1


def test_train_transform_follows_the_recipe() -> None:
    steps = train_transform((32, 48), 3, crop_area=(0.08, 0.9), randaugment_m=10).transforms
    crop = next(t for t in steps if isinstance(t, v2.RandomResizedCrop))
    assert crop.size == (32, 48) and crop.scale == (0.08, 0.9)
    augment = next(t for t in steps if isinstance(t, v2.RandAugment))
    assert augment.num_ops == 2 and augment.magnitude == 10
    assert any(isinstance(t, v2.RandomHorizontalFlip) for t in steps)
    plain = train_transform(32, 3, flip=False).transforms
    assert not any(isinstance(t, (v2.RandAugment, v2.RandomHorizontalFlip)) for t in plain)


def test_full_crop_without_flip_is_the_scaled_image_and_flip_mirrors_it() -> None:
    image = _image(3, 16, 16)
    expected = (image.float() - 127.5) / 127.5
    # A crop covering the whole square image is the image itself, so the pixels map exactly.
    torch.testing.assert_close(train_transform(16, 3, crop_area=(1.0, 1.0), flip=False)(image), expected)
    torch.manual_seed(0)
    flipping = train_transform(16, 3, crop_area=(1.0, 1.0))
    outs = [flipping(image) for _ in range(20)]
    assert any(torch.equal(o, expected) for o in outs)
    assert any(torch.equal(o, expected.flip(-1)) for o in outs)


def test_eval_resize_scales_pixels_to_minus_one_one() -> None:
    image = torch.tensor([[[0, 255], [127, 128]]], dtype=torch.uint8).expand(3, 2, 2)
    out = eval_transform(2, 3, "resize")(image)
    torch.testing.assert_close(out, (image.float() - 127.5) / 127.5)
    assert out[0, 0, 0] == -1 and out[0, 0, 1] == 1


def test_float_images_in_0_1_and_pil_images_are_the_same_pixels() -> None:
    image = _image(3, 40, 48)
    expected = eval_transform(32, 3)(image)
    torch.testing.assert_close(eval_transform(32, 3)(image.float() / 255), expected)
    torch.testing.assert_close(eval_transform(32, 3)(F.to_pil_image(image)), expected)
    assert eval_transform(32, 1)(F.to_pil_image(image).convert("RGBA")).shape == (1, 32, 32)
    torch.manual_seed(0)
    assert train_transform(32, 3, randaugment_m=9)(image.float() / 255).shape == (3, 32, 32)


@pytest.mark.parametrize("bad, said", [
    (torch.full((3, 8, 8), 200.0), r"pixels in \[0, 1\] .* got values from 200 to 200; scale them first"),
    (torch.zeros(3, 8, 8, dtype=torch.int32), "uint8 pixels or float ones in \\[0, 1\\], got torch.int32"),
    (torch.zeros(8, 8, dtype=torch.uint8), r"1 or 3 channels: .* got a tensor of shape \(8, 8\)"),
    (torch.zeros(3, 8, 8).numpy(), "or a PIL image; got a ndarray"),
])
def test_other_images_are_one_sentence(bad: object, said: str) -> None:
    for transform in (eval_transform(8, 3), train_transform(8, 3)):
        with pytest.raises(ValueError, match=said):
            transform(bad)


def test_eval_resize_is_direct_and_resmall_crop_keeps_the_ratio() -> None:
    image = _image(3, 40, 64)
    assert eval_transform(32, 3, "resize")(image).shape == (3, 32, 32)
    out = eval_transform(32, 3, "resmall-crop")(image)
    # Shorter side to round(32 * 256 / 224) = 37, then the central 32×32: the model's own size.
    manual = F.center_crop(F.resize(image, 37, antialias=True), [32, 32])
    torch.testing.assert_close(out, (manual.float() - 127.5) / 127.5)
    assert eval_transform(224, 3, "resmall-crop")(_image(3, 300, 400)).shape == (3, 224, 224)


def test_eval_greyscale_and_rgb_conversion() -> None:
    grey = _image(1, 8, 8)
    rgb = eval_transform(8, 3)(grey)
    assert rgb.shape == (3, 8, 8) and torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2])
    assert eval_transform(8, 1)(_image(3, 8, 8)).shape == (1, 8, 8)


def test_bad_arguments_are_one_sentence() -> None:
    with pytest.raises(ValueError, match="resmall-crop"):
        eval_transform(32, 3, "center")
    with pytest.raises(ValueError, match="in_chans=2"):
        train_transform(32, 2)
    with pytest.raises(ValueError, match="crop area"):
        train_transform(32, 3, crop_area=(0.5, 0.2))
    with pytest.raises(ValueError, match="positive"):
        mixup_cutmix(10, mixup=-0.1)
    with pytest.raises(ValueError, match="between 0 and 1"):
        mixup_cutmix(10, cutmix=1.0, prob=1.5)
    with pytest.raises(ValueError, match="padding"):
        train_transform(32, 3, pad_crop=-4)


def test_mixup_cutmix_gives_soft_labels() -> None:
    assert mixup_cutmix(10, 0.0, 0.0) is None
    assert isinstance(mixup_cutmix(10, 0.5, 0.0), v2.MixUp)
    assert isinstance(mixup_cutmix(10, 0.0, 1.0), v2.CutMix)
    both = mixup_cutmix(10, 0.5, 1.0)
    assert isinstance(both, v2.RandomChoice)
    torch.manual_seed(0)
    images = torch.randn(4, 3, 8, 8)
    labels = torch.tensor([0, 3, 3, 9])
    mixed, soft = both(images, labels)
    assert mixed.shape == images.shape
    assert soft.shape == (4, 10) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(1), torch.ones(4))
    # Each row mixes its own label with the label of another image of the batch.
    assert all(soft[i, labels[i]] > 0 for i in range(4))


def test_pad_crop_translates_within_zero_padding() -> None:
    """pad_crop replaces the Inception crop: same size out, the image shifted by at most `pad` pixels,
    the uncovered border zero (-1 in the model's range)."""
    steps = train_transform(32, 3, pad_crop=4, flip=False).transforms
    assert not any(isinstance(t, v2.RandomResizedCrop) for t in steps)
    assert next(t for t in steps if isinstance(t, v2.RandomCrop)).padding == [4, 4, 4, 4]
    image = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    torch.manual_seed(0)
    placements = set()
    for _ in range(40):
        out = train_transform(32, 3, pad_crop=4, flip=False)(image)
        assert out.shape == (3, 32, 32) and len(out.unique()) <= 2 and out.min() >= -1
        inside = out[0] > 0  # the image's pixels; the padding reads -1
        rows, cols = inside.any(1).nonzero().view(-1), inside.any(0).nonzero().view(-1)
        assert len(rows) >= 28 and len(cols) >= 28  # shifted by at most 4 pixels each way
        assert inside[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
        placements.add((int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])))
    assert len(placements) > 5


def test_mix_prob_mixes_that_share_of_the_batches() -> None:
    mix = mixup_cutmix(10, cutmix=1.0, prob=0.5)
    assert isinstance(mix, v2.RandomApply)
    assert mixup_cutmix(10, mixup=0.2, cutmix=1.0, prob=0.0) is None
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 3, 3, 9])
    mixed = sum(mix(images, labels)[1].ndim == 2 for _ in range(400))
    assert 150 < mixed < 250  # soft labels from the mixed batches, the class indices from the others
