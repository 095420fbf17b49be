"""The paper's permutation experiment (Figure 4): one fixed random shuffle of every image's pixels.

"patches" mode permutes the order of the patches and, with one shared permutation, the pixels inside
each patch; a Mixer's function class is unchanged by it (the stem absorbs the pixel order, the token
MLPs the patch order), while a convolution's locality bias is broken. "pixels" mode permutes all pixel
positions at once, which also mixes pixels across patches.
"""

from __future__ import annotations

import torch

from .recipes import PERMUTE_MODES
from .variants import Size, as_pair


class FixedPermutation:
    """A callable that applies the same seeded permutation of pixel positions to (..., C, H, W) tensors
    (one image or a batch); all channels move together."""

    def __init__(self, mode: str, img_size: Size, patch_size: Size = 16, seed: int = 0) -> None:
        if mode not in PERMUTE_MODES:
            raise ValueError(f"Unknown permutation mode {mode!r}; use one of {', '.join(PERMUTE_MODES)}.")
        (h, w), (ph, pw) = as_pair(img_size), as_pair(patch_size)
        if mode == "patches" and (h % ph or w % pw):
            raise ValueError(f"Image size {h}×{w} is not a multiple of the {ph}×{pw} patch; "
                             "choose a size divisible by the patch.")
        self.mode, self.img_size, self.patch_size, self.seed = mode, (h, w), (ph, pw), seed
        generator = torch.Generator().manual_seed(seed)
        # "patches" mode: output patch s is input patch patch_order[s], and inside every patch output
        # position q holds input position pixel_order[q] (row-major).
        self.patch_order: torch.Tensor | None = None
        self.pixel_order: torch.Tensor | None = None
        if mode == "pixels":
            self.index = torch.randperm(h * w, generator=generator)
        else:
            gh, gw = h // ph, w // pw
            # by_patch[s, q]: the flat pixel position of position q inside patch s (both row-major).
            by_patch = torch.arange(h * w).reshape(gh, ph, gw, pw).permute(0, 2, 1, 3).reshape(gh * gw, ph * pw)
            self.patch_order = torch.randperm(gh * gw, generator=generator)
            self.pixel_order = torch.randperm(ph * pw, generator=generator)
            shuffled = by_patch[self.patch_order][:, self.pixel_order]
            # Back from patch-major to image layout: output pixel -> input pixel it takes.
            self.index = shuffled.reshape(gh, gw, ph, pw).permute(0, 2, 1, 3).reshape(-1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim < 3 or tuple(images.shape[-2:]) != self.img_size:
            h, w = self.img_size
            raise ValueError(f"The permutation was made for {h}×{w} images (…, C, {h}, {w}), "
                             f"got a tensor of shape {tuple(images.shape)}.")
        flat = images.flatten(-2)
        return flat[..., self.index.to(images.device)].reshape(images.shape)

    def __repr__(self) -> str:
        return (f"FixedPermutation(mode={self.mode!r}, img_size={self.img_size}, "
                f"patch_size={self.patch_size}, seed={self.seed})")
