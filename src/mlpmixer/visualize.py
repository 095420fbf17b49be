"""Pictures of what a Mixer learns: token-mixing units as in the paper's Figure 5, and stem kernels.

Each hidden unit of a token-mixing MLP's first layer has one weight per input token, that is, one per
patch position: a row of fc1.weight (D_S×S) is a small image over the (g_h, g_w) patch grid. The paper
pairs the units to show kernels of opposite phase and sorts the pairs by spatial frequency; here the pairs
are found greedily (pair_opposite_phase), so a unit's partner is not always its most opposite one.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from .model import MlpMixer
from .reports import save_figure

CMAP = "RdBu_r"  # diverging: red positive, blue negative, white zero
GAP_COLOUR = "0.3"  # dark grey between tiles, so it is not read as a zero (white) weight


def token_mixing_units(model: MlpMixer, block: int) -> np.ndarray:
    """The first token-mixing layer's hidden units of `block` as (D_S, g_h, g_w) images."""
    n = len(model.blocks)
    if not 0 <= block < n:
        raise ValueError(f"Block {block} does not exist: {model.config.describe()} has blocks 0…{n - 1}.")
    weight = model.blocks[block].mlp_tokens.fc1.weight.detach().float().cpu().numpy()
    gh, gw = model.config.grid
    if weight.shape[1] != gh * gw:
        raise ValueError(f"Block {block}'s token-mixing layer takes {weight.shape[1]} tokens, not the "
                         f"{gh}×{gw} patch grid of the configuration; the checkpoint does not match it.")
    return weight.reshape(-1, gh, gw)


def pair_opposite_phase(units: np.ndarray) -> list[tuple[int, int | None]]:
    """Greedy pairing: repeatedly join the two unpaired units whose weights are most negatively
    correlated. An odd unit out is paired with None."""
    flat = units.reshape(len(units), -1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        # atleast_2d: a single unit's correlation comes back as a scalar. Constant units correlate with nothing.
        corr = np.atleast_2d(np.nan_to_num(np.corrcoef(flat), nan=0.0))
    i, j = np.triu_indices(len(units), k=1)
    order = np.argsort(corr[i, j], kind="stable")
    free = np.ones(len(units), dtype=bool)
    pairs: list[tuple[int, int | None]] = []
    for a, b in zip(i[order].tolist(), j[order].tolist()):
        if free[a] and free[b]:
            free[a] = free[b] = False
            pairs.append((a, b))
    pairs += [(int(a), None) for a in np.flatnonzero(free)]
    return pairs


def spatial_frequency(units: np.ndarray) -> np.ndarray:
    """Each unit's mean spatial frequency (cycles per patch), weighted by its 2-D spectrum's energy.

    The unit's mean is removed first, so an offset does not hide the pattern; a constant unit gets 0.
    """
    n, gh, gw = units.shape
    centred = units - units.mean(axis=(1, 2), keepdims=True)
    energy = np.abs(np.fft.fft2(centred)) ** 2
    radius = np.hypot(*np.meshgrid(np.fft.fftfreq(gh), np.fft.fftfreq(gw), indexing="ij"))
    total = energy.sum(axis=(1, 2))
    weighted = (energy * radius).sum(axis=(1, 2))
    return np.divide(weighted, total, out=np.zeros(n), where=total > 0)


def ordered_pairs(units: np.ndarray) -> list[tuple[int, int | None]]:
    """The pairs of pair_opposite_phase, lowest spatial frequency first (by the pair's mean frequency)."""
    freq = spatial_frequency(units)
    pairs = pair_opposite_phase(units)
    return sorted(pairs, key=lambda p: float(np.mean([freq[u] for u in p if u is not None])))


def _mosaic(tiles: list[np.ndarray], columns: int, gap: int, group: int = 1, group_gap: int = 0) -> np.ndarray:
    """Lay (h, w[, 3]) tiles out row-major, `columns` per row, NaN between them; every `group`
    tiles on a row get an extra `group_gap` after them (to show pairs)."""
    h, w = tiles[0].shape[:2]
    extra = tiles[0].shape[2:]
    rows = math.ceil(len(tiles) / columns)
    col_x = [c * (w + gap) + (c // group) * group_gap for c in range(columns)]
    out = np.full((rows * (h + gap) - gap, col_x[-1] + w, *extra), np.nan)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        out[r * (h + gap):r * (h + gap) + h, col_x[c]:col_x[c] + w] = tile
    return out


def _even_columns(count: int, most: int) -> int:
    """Columns for `count` tiles in the fewest rows of at most `most`, the rows as even as they can be:
    12 tiles as 8 + 4 left half the second row a slab of gap colour, which reads as missing tiles; 6 + 6 fill it."""
    rows = math.ceil(count / most)
    return math.ceil(count / rows)


def _cmap():
    import matplotlib

    return matplotlib.colormaps[CMAP].with_extremes(bad=GAP_COLOUR)


def plot_token_mixing(model: MlpMixer, path: str | os.PathLike, blocks: Sequence[int] | None = None,
                      max_pairs: int | None = None) -> Path:
    """Draw the first token-mixing layer's units of `blocks` (default: the first three), one panel per
    block, units paired greedily (pair_opposite_phase), pairs sorted by spatial frequency. Each pair is
    scaled by its largest |weight| so that all are readable; zero is white."""
    if blocks is None:
        blocks = list(range(min(3, len(model.blocks))))
    if not blocks:
        raise ValueError("Name at least one block to draw.")
    if max_pairs is not None and max_pairs < 1:  # [:0] drew empty panels, [:-2] dropped the last pairs
        raise ValueError(f"max_pairs is the number of pairs to draw per block, at least 1 (or None: all), "
                         f"not {max_pairs}.")
    blocks = list(dict.fromkeys(blocks))  # a block named twice is drawn once
    panels = []
    for b in blocks:
        units = token_mixing_units(model, b)
        pairs = ordered_pairs(units)[:max_pairs]
        tiles = []
        for pair in pairs:
            members = [units[u] for u in pair if u is not None]
            scale = max(np.abs(m).max() for m in members) or 1.0
            tiles += [m / scale for m in members] + [np.full_like(units[0], np.nan)] * (2 - len(members))
        columns = 2 * _even_columns(len(pairs), 8)
        panels.append((b, len(units), _mosaic(tiles, columns=columns, gap=1, group=2, group_gap=2)))
    gh, gw = model.config.grid
    height, width = panels[0][2].shape
    # About 0.025 inch per weight (4 pixels at 150 dpi), so that 14×14 units stay legible.
    panel_w = max(4.0, 0.025 * width)
    # At least 9 inches wide so the three-line title fits above a single small panel.
    fig_w = max(9.0, panel_w * len(panels) + 1.0)
    fig = Figure(figsize=(fig_w, (fig_w - 1.0) / len(panels) * height / width + 1.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    cmap = _cmap()
    for ax, (b, count, mosaic) in zip(axes, panels):
        im = ax.imshow(mosaic, cmap=cmap, vmin=-1.0, vmax=1.0, interpolation="nearest")
        shown = f", {2 * max_pairs} shown" if max_pairs and 2 * max_pairs < count else ""
        ax.set_title(f"block {b}: {count} units{shown}", fontsize=10)
        ax.set_axis_off()
    # The bar in an inset of the last panel's axes, which follow its mosaic (an image keeps its aspect by
    # shrinking its axes): as tall as the mosaic. `fig.colorbar(ax=axes)` took the height of the space the
    # layout gave the panels, which a short, wide mosaic (few units) fills only in part, and its label, longer
    # than such a bar, stretched the picture by a blank band below the mosaics: the title says what the scale is.
    tall = panel_w * height / width >= 0.5  # inches: room for three tick labels
    fig.colorbar(im, cax=axes[-1].inset_axes([1.02, 0.0, 0.15 / panel_w, 1.0]), ticks=[-1, 0, 1] if tall else [-1, 1])
    fig.suptitle(
        f"{model.config.describe()}: token-mixing hidden units (rows of W1 over the {gh}×{gw} patch grid),\n"
        # Says what pair_opposite_phase does: a greedy pairing, so a unit's partner is not always the unit
        # most opposite to it, and the last pairs formed can even correlate positively.
        "paired greedily by most negative correlation among the units still unpaired,\n"
        "pairs sorted from low to high spatial frequency, each pair scaled by its largest |weight| (zero is white)",
        fontsize=11,
    )
    return save_figure(fig, path)


def plot_stem(model: MlpMixer, path: str | os.PathLike, max_kernels: int | None = None) -> Path:
    """Draw the patch-embedding kernels (C, in, P, P): RGB tiles for 3 input channels, heat maps for
    one. Each kernel is scaled by its own largest |weight|, so zero is mid-grey (RGB) or white."""
    if max_kernels is not None and max_kernels < 1:
        raise ValueError(f"max_kernels is the number of kernels to draw, at least 1 (or None: all), not {max_kernels}.")
    weight = model.stem.proj.weight.detach().float().cpu().numpy()[:max_kernels]
    cin = weight.shape[1]
    if cin not in (1, 3):
        raise ValueError(f"Stem kernels are drawn for 1 or 3 input channels, not {cin}.")
    scale = np.abs(weight).max(axis=(1, 2, 3), keepdims=True)
    normed = weight / np.where(scale > 0, scale, 1.0)
    columns = _even_columns(len(weight), max(8, math.ceil(math.sqrt(len(weight)))))
    if cin == 3:
        tiles = [0.5 + 0.5 * k.transpose(1, 2, 0) for k in normed]
        mosaic = _mosaic(tiles, columns=columns, gap=1)
        mosaic = np.where(np.isnan(mosaic), 1.0, mosaic)  # white gaps
        cmap, limits = None, {}
    else:
        mosaic = _mosaic([k[0] for k in normed], columns=columns, gap=1)
        cmap, limits = _cmap(), {"vmin": -1.0, "vmax": 1.0}
    height, width = mosaic.shape[:2]
    # As tall as the mosaic is at the width it gets (less a colour bar's), plus the two-line title:
    # more left a blank band between the title and the mosaic.
    mosaic_w = 7.0 if cin == 1 else 8.0
    fig = Figure(figsize=(8.0, mosaic_w * height / width + 0.7), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(mosaic, cmap=cmap, interpolation="nearest", **limits)
    ax.set_axis_off()
    if cin == 1:  # signed heat maps need their scale; RGB tiles have none to show
        # As tall as the mosaic, and unlabelled as in plot_token_mixing: a label longer than the bar beside a
        # mosaic of one or two rows made the layout shrink the mosaic. The title says what the scale is.
        fig.colorbar(im, cax=ax.inset_axes([1.03, 0.0, 0.03, 1.0]), ticks=[-1, 0, 1])
    (ph, pw) = model.config.patch_size
    zero = "mid-grey" if cin == 3 else "white"
    fig.suptitle(f"{model.config.describe()}: {len(weight)} patch-embedding (stem) kernels, {ph}×{pw}"
                 f"{' RGB' if cin == 3 else ''},\neach scaled by its largest |weight|; zero is {zero}",
                 fontsize=11)
    return save_figure(fig, path)
