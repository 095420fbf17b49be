"""The training augmentation of `transforms.train_transform`, applied to whole batches on the training
device (recipe `augment_on="device"`): for small images held in memory, such as CIFAR-10's.

Why not the DataLoader workers: for 32×32 images the model is so cheap that a GPU trains faster than
16 CPU cores can crop and RandAugment image by image (measured on an H100: about 7,000 images/s from the
workers, while the GPU sat mostly idle). Why not torchvision's transforms on a batch: they draw one set
of parameters per call, so a whole batch would get the same crop and the same RandAugment operations.

Here every random choice is drawn per image, on the CPU, from the caller's generator (so the result
does not depend on the device), and each distinct choice is applied once, to the rows that made it:

- Inception-style random resized crop, torchvision's sampling (ten tries of an area in `crop_area` and
  an aspect ratio in [3/4, 4/3], else the central crop), with each image's box cropped and resized in
  one call (`torchvision.ops.roi_align`, bilinear: inside the box as `RandomResizedCrop` for enlarging
  crops; on the box's edge it reads the pixels just outside where torchvision repeats the edge pixel);
  or, with `pad` > 0, the small-image crop of `v2.RandomCrop(img_size, padding=pad)`: zero padding,
  then a box of img_size at a random place, copied exactly (images of another size are resized first);
- horizontal flip with probability 1/2;
- RandAugment(2, m) with torchvision's operations and magnitudes (31 bins, nearest interpolation,
  fill 0), or AutoAugment with one of torchvision's learned policies (each image draws one of its 25
  sub-policies, whose two operations run with their own probabilities at their own levels of 10), through
  torchvision's functional ops: each distinct (operation, level, sign) of a round is one call, for
  RandAugment at most 2 × 22 (Identity is none) however many images `apply` gets (training hands it
  several steps' batches at once).

The draws reach the device with non-blocking copies: a blocking one makes PyTorch wait for the device
to finish everything queued (the training steps before), and from pageable memory CUDA takes the data
at once anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
from torchvision.ops import roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .transforms import checked_autoaugment, checked_crop_area, checked_pad
from .variants import Size, as_pair

RANDAUGMENT_OPS = 2  # RandAugment(N=2, m), as the paper's recipes use it
MAGNITUDE_BINS = 31  # torchvision's default number of magnitude levels (m is one of 0..30)
AUTOAUGMENT_BINS = 10  # AutoAugment's policies name levels 0..9 (torchvision's AutoAugment)
CROP_TRIES = 10  # torchvision's RandomResizedCrop tries this many boxes before the central crop
RATIO = (3 / 4, 4 / 3)  # and these aspect ratios

Op = Callable[[torch.Tensor, float], torch.Tensor]
NEAREST = InterpolationMode.NEAREST


def _affine(x: torch.Tensor, translate: tuple[int, int] = (0, 0), shear: tuple[float, float] = (0.0, 0.0),
            center: Optional[list[int]] = None) -> torch.Tensor:
    return F.affine(x, angle=0.0, translate=list(translate), scale=1.0, shear=list(shear),
                    interpolation=NEAREST, fill=None, center=center)


# torchvision's operations of RandAugment and AutoAugment: name -> (operation at a signed magnitude, the
# magnitudes of n levels for an image of height h and width w, whether the sign is drawn).
OPERATIONS: dict[str, tuple[Op, Callable[[int, int, int], Optional[torch.Tensor]], bool]] = {
    "Identity": (lambda x, v: x, lambda n, h, w: None, False),
    # Shears are given as angles whose tangent is the level, about the top-left corner (as AutoAugment).
    "ShearX": (lambda x, v: _affine(x, shear=(math.degrees(math.atan(v)), 0.0), center=[0, 0]),
               lambda n, h, w: torch.linspace(0.0, 0.3, n), True),
    "ShearY": (lambda x, v: _affine(x, shear=(0.0, math.degrees(math.atan(v))), center=[0, 0]),
               lambda n, h, w: torch.linspace(0.0, 0.3, n), True),
    "TranslateX": (lambda x, v: _affine(x, translate=(int(v), 0)),
                   lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * w, n), True),
    "TranslateY": (lambda x, v: _affine(x, translate=(0, int(v))),
                   lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * h, n), True),
    "Rotate": (lambda x, v: F.rotate(x, angle=v, interpolation=NEAREST),
               lambda n, h, w: torch.linspace(0.0, 30.0, n), True),
    "Brightness": (lambda x, v: F.adjust_brightness(x, 1.0 + v),
                   lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Color": (lambda x, v: F.adjust_saturation(x, 1.0 + v),
              lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Contrast": (lambda x, v: F.adjust_contrast(x, 1.0 + v),
                 lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Sharpness": (lambda x, v: F.adjust_sharpness(x, 1.0 + v),
                  lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Posterize": (lambda x, v: F.posterize(x, bits=int(v)),
                  lambda n, h, w: (8 - (torch.arange(n) / ((n - 1) / 4))).round().int(), False),
    "Solarize": (lambda x, v: F.solarize(x, threshold=255.0 * v),
                 lambda n, h, w: torch.linspace(1.0, 0.0, n), False),
    "AutoContrast": (lambda x, v: F.autocontrast(x), lambda n, h, w: None, False),
    "Equalize": (lambda x, v: F.equalize(x), lambda n, h, w: None, False),
    "Invert": (lambda x, v: F.invert(x), lambda n, h, w: None, False),  # AutoAugment's only
}
# RandAugment draws among all but the last, in torchvision's order (v2.RandAugment's space).
RANDAUGMENT_SPACE = list(OPERATIONS)[:-1]


@dataclass
class Draws:
    """The random choices for n images: crop boxes (n, 4) as (x1, y1, x2, y2) pixels, flips (n,), and for
    each of the two rounds of RandAugment or steps of an AutoAugment sub-policy (n, 2): the operation (an
    index into OPERATIONS, -1 for none), its level and whether its sign is negative. All on the CPU."""

    boxes: torch.Tensor
    flips: torch.Tensor
    ops: torch.Tensor
    levels: torch.Tensor
    negative: torch.Tensor

    def __getitem__(self, rows: torch.Tensor) -> "Draws":
        return Draws(*(getattr(self, f.name)[rows] for f in fields(Draws)))

    @staticmethod
    def cat(parts: list["Draws"]) -> "Draws":
        return Draws(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Draws)))


class BatchAugment:
    """uint8 images (B, C, H, W) on any device -> float32 (B, C, *img_size) in [-1, 1], each image
    cropped, flipped and RandAugment-ed or AutoAugment-ed with its own draws (see the module docstring).

    `draw` makes the choices, `apply` carries them out; each image's result depends only on its own
    image and draws, so the draws of several batches can be applied in one call."""

    def __init__(self, img_size: Size, crop_area: tuple[float, float] = (0.05, 1.0), flip: bool = True,
                 randaugment_m: Optional[int] = None, pad: int = 0, autoaugment: Optional[str] = None) -> None:
        low, high = checked_crop_area(crop_area)
        self.pad = checked_pad(pad)
        if randaugment_m is not None and not 0 <= randaugment_m < MAGNITUDE_BINS:
            raise ValueError(f"The RandAugment magnitude must be 0 to {MAGNITUDE_BINS - 1}, not {randaugment_m}.")
        self.img_size, self.crop_area, self.flip, self.m = as_pair(img_size), (low, high), flip, randaugment_m
        # AutoAugment's sub-policies as tensors (S, 2) of operation indices, probabilities and levels.
        # torchvision keeps its policy tables in a private attribute; tests/test_batch_augment.py compares
        # them with what v2.AutoAugment does, so that a change there shows.
        self.policy: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        policy = checked_autoaugment(autoaugment, randaugment_m)
        if policy is not None:
            pairs = v2.AutoAugment(policy)._policies
            names = list(OPERATIONS)
            self.policy = (torch.tensor([[names.index(name) for name, _, _ in pair] for pair in pairs]),
                           torch.tensor([[p for _, p, _ in pair] for pair in pairs], dtype=torch.float64),
                           torch.tensor([[level or 0 for _, _, level in pair] for pair in pairs]))
        # Each operation's magnitudes for the crops' size (which the operations see), once.
        bins = AUTOAUGMENT_BINS if policy is not None else MAGNITUDE_BINS
        self.magnitudes = {name: levels(bins, *self.img_size) for name, (_, levels, _) in OPERATIONS.items()}

    def draw(self, n: int, h: int, w: int, generator: torch.Generator) -> Draws:
        """The choices for n images of h × w pixels."""
        if self.pad:  # boxes of img_size in the padded image, which crop() reads exactly
            th, tw = self.img_size
            corner = torch.randint(2 * self.pad + 1, (n, 2), generator=generator).float()  # (top, left)
            boxes = torch.stack([corner[:, 1], corner[:, 0], corner[:, 1] + tw, corner[:, 0] + th], 1)
        else:
            boxes = crop_boxes(n, h, w, self.crop_area, generator)
        flips = torch.rand(n, generator=generator) < 0.5
        if self.policy is not None:  # one sub-policy per image, each of its steps taken with its probability
            op_ids, chance, level = self.policy
            sub = torch.randint(len(op_ids), (n,), generator=generator)
            taken = torch.rand(n, 2, generator=generator, dtype=torch.float64) < chance[sub]
            ops, levels = torch.where(taken, op_ids[sub], -1), level[sub]
        else:  # RandAugment: two operations of its space at level m (none without it)
            ops = torch.randint(len(RANDAUGMENT_SPACE), (n, RANDAUGMENT_OPS), generator=generator)
            levels = torch.full((n, RANDAUGMENT_OPS), self.m or 0)
        return Draws(boxes, flips, ops, levels, torch.rand(n, 2, generator=generator) < 0.5)

    def apply(self, images: torch.Tensor, draws: Draws) -> torch.Tensor:
        """Augment uint8 `images` (on any device) as `draws` (one row per image) say."""
        if self.pad:
            if tuple(images.shape[-2:]) != self.img_size:
                images = F.resize(images, list(self.img_size), antialias=True)
            images = torch.nn.functional.pad(images, [self.pad] * 4)
        x = self.crop(images, draws.boxes)
        if self.flip:
            x = torch.where(draws.flips.to(x.device, non_blocking=True).view(-1, 1, 1, 1), x.flip(-1), x)
        if self.m is not None or self.policy is not None:
            x = self.operations(x, draws.ops, draws.levels, draws.negative)
        return x.float() / 127.5 - 1.0  # the official scaling, as transforms._to_model_range

    def __call__(self, images: torch.Tensor, generator: torch.Generator,
                 rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draw for the whole batch and apply. `rows` (indices into the batch) augments only those
        images, in that order, with the draws they get when the whole batch is augmented: a process of
        several augments its own share."""
        draws = self.draw(len(images), *images.shape[-2:], generator)
        if rows is not None:
            images, draws = images[rows], draws[rows]
        return self.apply(images, draws)

    def crop(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Each image's (x1, y1, x2, y2) pixel box, resized to img_size; uint8 out, as the operations take it."""
        index = torch.arange(len(boxes), dtype=boxes.dtype).view(-1, 1)
        rois = torch.cat([index, boxes], 1).to(images.device, non_blocking=True)
        # aligned=True puts pixel k's centre at k + 0.5, so a box at the output size copies its pixels
        # exactly; sampling_ratio=-1 averages ceil(box / output) samples per output pixel when shrinking.
        out = roi_align(images.float(), rois, self.img_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        return out.round_().clamp_(0, 255).to(torch.uint8)

    def operations(self, x: torch.Tensor, ops: torch.Tensor, levels: torch.Tensor,
                   negative: torch.Tensor) -> torch.Tensor:
        """The operations of img_size images, round by round (columns of `ops`, `levels`, `negative`):
        each distinct operation, level and sign of a round runs once, on the rows that drew it."""
        groups: list[tuple[Op, float, torch.Tensor]] = []  # in order: the first round's, then the second's
        for k in range(ops.shape[1]):
            for op_id, (name, (op, _, signed)) in enumerate(OPERATIONS.items()):
                chose = ops[:, k] == op_id
                if name == "Identity" or not chose.any():
                    continue
                table = self.magnitudes[name]
                for level in levels[chose, k].unique().tolist():
                    at_level = chose & (levels[:, k] == level)
                    value = float(table[level]) if table is not None else 0.0
                    for sign in ((False, True) if signed else (None,)):
                        mask = at_level & (negative[:, k] == sign) if sign is not None else at_level
                        if mask.any():
                            groups.append((op, -value if sign else value, mask.nonzero().view(-1)))
        if not groups:
            return x
        # All the row indices reach the device in one copy.
        rows = torch.cat([index for _, _, index in groups]).to(x.device, non_blocking=True)
        rows = rows.split([len(g[2]) for g in groups])
        x = x.clone()
        for (op, value, _), index in zip(groups, rows):
            x[index] = op(x[index], value)
        return x


def crop_boxes(n: int, h: int, w: int, area: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """(n, 4) float boxes (x1, y1, x2, y2) in pixels, drawn as torchvision's RandomResizedCrop does,
    one image at a time: the first of ten (area, aspect ratio) tries that fits, else the central crop
    of the whole image clamped to the ratio range."""
    low, high = area
    target = h * w * (low + (high - low) * torch.rand(n, CROP_TRIES, generator=generator, dtype=torch.float64))
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, CROP_TRIES, generator=generator,
                                                                dtype=torch.float64))
    cw, ch = torch.sqrt(target * aspect).round(), torch.sqrt(target / aspect).round()
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.to(torch.int8).argmax(1)  # the first try that fits (0 when none does: replaced below)
    pick = torch.arange(n)
    cw, ch = cw[pick, first], ch[pick, first]
    # The fallback: the whole image, clamped to the ratio range.
    in_ratio = w / h
    fw, fh = (w, round(w / RATIO[0])) if in_ratio < RATIO[0] else (round(h * RATIO[1]), h) if in_ratio > RATIO[1] else (w, h)
    none = ~fits.any(1)
    cw, ch = torch.where(none, float(fw), cw), torch.where(none, float(fh), ch)
    position = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.where(none, float((h - fh) // 2), (position[:, 0] * (h - ch + 1)).floor())
    left = torch.where(none, float((w - fw) // 2), (position[:, 1] * (w - cw + 1)).floor())
    return torch.stack([left, top, left + cw, top + ch], 1).float()
