"""Preprocessing the paper's way (SPEC §4), with torchvision transforms v2.

Every transform takes a uint8 (C, H, W) tensor, as `mlpmixer.sources` decodes it (C = 1 for greyscale
images, 3 otherwise), and returns a float32 (in_chans, H, W) tensor with pixels in [-1, 1]
((x - 127.5) / 127.5, the official scaling), at the model's own input size. A float tensor with pixels in
[0, 1] (torchvision's convention for float images) and a PIL image are taken too, as the 8-bit pixels they
hold; anything else is refused in one sentence.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .recipes import EVAL_MODES
from .variants import Size, as_pair

Transform = Callable[[torch.Tensor], torch.Tensor]

# "resmall-crop" resizes the shorter side to 256 before a 224 centre crop; other sizes keep the ratio.
RESMALL_RATIO = 256 / 224


def to_channels(in_chans: int) -> v2.Transform:
    """Greyscale <-> RGB conversion, so any image feeds a model with `in_chans` channels."""
    if in_chans == 3:
        return v2.RGB()  # 1 channel -> 3, 3 channels unchanged
    if in_chans == 1:
        return v2.Grayscale(1)  # 3 channels -> luminance, 1 channel unchanged
    raise ValueError(
        f"Images have 1 (greyscale) or 3 (RGB) channels; a model with in_chans={in_chans} cannot take them."
    )


def as_uint8_image(image: Any) -> torch.Tensor:
    """A PIL image or a (C, H, W) tensor as the uint8 pixels the transforms work on (RandAugment and the
    rounding of Resize are those of 8-bit images, as the decoded files give them)."""
    if isinstance(image, Image.Image):
        return F.pil_to_tensor(image if image.mode in ("L", "RGB") else image.convert("RGB"))
    if not isinstance(image, torch.Tensor) or image.ndim < 3 or image.shape[-3] not in (1, 3):
        what = (f"a tensor of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor)
                else f"a {type(image).__name__}")
        raise ValueError(f"The transforms take a (C, H, W) image with 1 or 3 channels: a uint8 tensor, a float "
                         f"tensor with pixels in [0, 1], or a PIL image; got {what}.")
    if image.dtype == torch.uint8:
        return image
    if image.is_floating_point() and (image.numel() == 0 or 0 <= image.min() and image.max() <= 1):
        return image.mul(255).round_().to(torch.uint8)  # [0, 1] -> 0..255, the nearest level
    if image.is_floating_point():
        raise ValueError(f"Float images are taken with pixels in [0, 1] (torchvision's convention), got values "
                         f"from {image.min().item():g} to {image.max().item():g}; scale them first, or give "
                         "uint8 pixels.")
    raise ValueError(f"The transforms take uint8 pixels or float ones in [0, 1], got {image.dtype}.")


def _to_model_range(in_chans: int) -> list[v2.Transform]:
    """uint8 -> float32 in [-1, 1]: (x - 127.5) / 127.5, as the official input pipeline scales pixels."""
    return [v2.ToDtype(torch.float32, scale=False), v2.Normalize([127.5] * in_chans, [127.5] * in_chans)]


def checked_crop_area(crop_area: tuple[float, float]) -> tuple[float, float]:
    """The (low, high) fraction of the image a random resized crop covers, checked."""
    low, high = crop_area
    if not 0 < low <= high <= 1:
        raise ValueError(f"The crop area range must satisfy 0 < low <= high <= 1, not {crop_area}.")
    return low, high


def checked_pad(pad: int) -> int:
    if pad < 0:
        raise ValueError(f"The crop padding must be 0 (Inception crop) or a number of pixels, not {pad}.")
    return pad


def checked_autoaugment(autoaugment: Optional[str], randaugment_m: Optional[int]) -> Optional[v2.AutoAugmentPolicy]:
    """torchvision's AutoAugment policy named `autoaugment` (imagenet, cifar10 or svhn; None: none), which
    replaces RandAugment: asking for both, or for another policy, is one sentence."""
    if autoaugment is None:
        return None
    if randaugment_m is not None:
        raise ValueError("RandAugment and AutoAugment are alternatives; give one of them.")
    try:
        return v2.AutoAugmentPolicy(autoaugment)
    except ValueError:
        choices = ", ".join(p.value for p in v2.AutoAugmentPolicy)
        raise ValueError(f"Unknown AutoAugment policy {autoaugment!r}; choose one of {choices}.") from None


def train_transform(
    img_size: Size,
    in_chans: int = 3,
    *,
    crop_area: tuple[float, float] = (0.05, 1.0),
    randaugment_m: Optional[int] = None,
    flip: bool = True,
    pad_crop: int = 0,
    autoaugment: Optional[str] = None,
) -> Transform:
    """Training augmentation: Inception-style random resized crop covering `crop_area` of the image
    (official 0.05-1), random horizontal flip, RandAugment(2, m) when `randaugment_m` is given, or
    AutoAugment with torchvision's learned policy `autoaugment` (imagenet, cifar10 or svhn).

    `pad_crop` > 0 replaces the Inception crop by the small-image one (CIFAR's usual): resize to
    img_size, pad with zeros by `pad_crop` pixels on each side, crop img_size back at a random place."""
    low, high = checked_crop_area(crop_area)
    size = as_pair(img_size)
    policy = checked_autoaugment(autoaugment, randaugment_m)
    if checked_pad(pad_crop):
        crop: list[v2.Transform] = [v2.Resize(size, antialias=True), v2.RandomCrop(size, padding=pad_crop)]
    else:
        crop = [v2.RandomResizedCrop(size, scale=(low, high), antialias=True)]
    steps: list[Any] = [as_uint8_image, to_channels(in_chans), *crop]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if randaugment_m is not None:
        # After the crop, as big_vision does, so the augmentations work on the small image.
        steps.append(v2.RandAugment(num_ops=2, magnitude=randaugment_m))
    if policy is not None:
        steps.append(v2.AutoAugment(policy))
    return v2.Compose(steps + _to_model_range(in_chans))


def eval_transform(img_size: Size, in_chans: int = 3, mode: str = "resize") -> Transform:
    """Evaluation preprocessing (SPEC §4): "resize" resizes straight to the model's input size;
    "resmall-crop" resizes the shorter side to 256/224 of it, then takes the central crop."""
    size = as_pair(img_size)
    if mode == "resize":
        resize: list[v2.Transform] = [v2.Resize(size, antialias=True)]
    elif mode == "resmall-crop":
        shorter = round(max(size) * RESMALL_RATIO)
        resize = [v2.Resize(shorter, antialias=True), v2.CenterCrop(size)]
    else:
        raise ValueError(f"Unknown evaluation preprocessing {mode!r}; choose one of {', '.join(EVAL_MODES)}.")
    return v2.Compose([as_uint8_image, to_channels(in_chans), *resize, *_to_model_range(in_chans)])


def mixup_cutmix(num_classes: int, mixup: float = 0.0, cutmix: float = 0.0,
                 prob: float = 1.0) -> Optional[v2.Transform]:
    """A batch transform (images (B, C, H, W), int labels (B,)) -> (mixed images, soft labels
    (B, num_classes)) that applies MixUp (alpha = `mixup`) or CutMix (alpha = `cutmix`), one chosen at
    random per batch, to a share `prob` of the batches (the others pass unchanged, int labels and all);
    None when both are 0 or `prob` is. Label smoothing is left to the loss."""
    if mixup < 0 or cutmix < 0:
        raise ValueError(f"Mixup and CutMix strengths must be 0 (off) or positive, not {mixup} and {cutmix}.")
    if not 0 <= prob <= 1:
        raise ValueError(f"The share of mixed batches must be between 0 and 1, not {prob}.")
    if prob == 0:
        return None
    choices: list[v2.Transform] = []
    if mixup > 0:
        choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not choices:
        return None
    mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
    return mix if prob == 1 else v2.RandomApply([mix], p=prob)
