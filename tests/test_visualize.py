"""Pictures of token-mixing units (paper Figure 5) and stem kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mlpmixer import create_model, save_checkpoint
from mlpmixer.cli import main
from mlpmixer.visualize import (
    ordered_pairs,
    pair_opposite_phase,
    plot_stem,
    plot_token_mixing,
    spatial_frequency,
    token_mixing_units,
)


def wave(freq: float, phase: float = 0.0, size: int = 8) -> np.ndarray:
    """A 2-D cosine along the rows: `freq` cycles per token."""
    yy, xx = np.mgrid[0:size, 0:size]
    return np.cos(2 * np.pi * freq * (xx + 0.5 * yy) + phase)


def test_unit_pairs_with_its_negation():
    rng = np.random.default_rng(0)
    base = [rng.normal(size=(6, 6)) for _ in range(4)]
    units = np.stack(base + [-b + 0.05 * rng.normal(size=(6, 6)) for b in base] + [rng.normal(size=(6, 6))])
    pairs = pair_opposite_phase(units)
    assert {frozenset(p) for p in pairs if None not in p} == {frozenset((i, i + 4)) for i in range(4)}
    assert (8, None) in pairs
    assert sorted(u for p in pairs for u in p if u is not None) == list(range(9))  # each unit once
    assert pair_opposite_phase(units[:1]) == [(0, None)]  # a single unit (its correlation is a scalar)


def test_pairing_is_greedy_not_each_units_best():
    """What the title and the docs say: the most negatively correlated pair is taken first, so a unit can
    lose its most opposite unit to another, and the units left over pair even when they correlate positively."""
    rng = np.random.default_rng(0)
    u1, u2 = (v - v.mean() for v in rng.normal(size=(2, 16)))
    c = -(0.8 * u1 + 0.6 * u2)
    units = np.stack([u1, -u1, c, c + 0.1 * u2]).reshape(4, 4, 4)
    corr = np.corrcoef(units.reshape(4, -1))
    assert np.argsort(corr[2])[0] == 0  # unit 2's most opposite unit is 0 ...
    assert pair_opposite_phase(units) == [(0, 1), (2, 3)]  # ... which pairs with 1 first
    assert corr[2, 3] > 0.9


def test_low_frequency_before_high():
    low, high = wave(1 / 8), wave(3 / 8)
    freq = spatial_frequency(np.stack([high, low, np.full((8, 8), 2.0)]))
    assert freq[1] < freq[0]
    assert freq[2] == 0.0  # a constant unit has no pattern
    units = np.stack([high, low, -high, -low])
    assert ordered_pairs(units) in ([(1, 3), (0, 2)], [(3, 1), (0, 2)], [(1, 3), (2, 0)], [(3, 1), (2, 0)])


def tiny(in_chans: int = 3):
    torch.manual_seed(0)
    return create_model("digits/4", img_size=(16, 24), in_chans=in_chans, hidden_dim=12, num_blocks=4,
                        tokens_mlp_dim=10, channels_mlp_dim=8, num_classes=2)


def test_units_follow_fc1_rows():
    model = tiny()
    units = token_mixing_units(model, 2)
    assert units.shape == (10, 4, 6)
    np.testing.assert_array_equal(units[3].reshape(-1), model.blocks[2].mlp_tokens.fc1.weight[3].detach().numpy())
    with pytest.raises(ValueError, match="blocks 0…3"):
        token_mixing_units(model, 4)


def check_png(path, min_side=200):
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert min_side <= min(im.size) and max(im.size) <= 6000
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 10  # not blank


def test_title_says_the_pairing_is_greedy(tmp_path, monkeypatch):
    import mlpmixer.visualize as visualize

    figures = []
    monkeypatch.setattr(visualize, "save_figure", lambda fig, path: figures.append(fig) or path)
    plot_token_mixing(tiny(), tmp_path / "units.png")
    title = figures[0].get_suptitle()
    assert "paired greedily by most negative correlation among the units still unpaired" in title
    assert "partner" not in title  # it said "each beside its most opposite-phase partner", which most are not


@pytest.mark.parametrize("units, max_pairs", [(10, None), (10, 1), (64, None), (64, 8)])
def test_colour_bar_is_as_tall_as_the_mosaic(tmp_path, monkeypatch, units, max_pairs):
    """Beside a short mosaic (few units: one or two rows) the bar took the height of the panel's space, leaving a
    blank band above and below the mosaic."""
    import mlpmixer.visualize as visualize

    figures, save = [], visualize.save_figure
    monkeypatch.setattr(visualize, "save_figure", lambda fig, path: figures.append(fig) or save(fig, path))
    torch.manual_seed(0)
    model = create_model("digits/4", img_size=(16, 24), hidden_dim=12, num_blocks=2, tokens_mlp_dim=units,
                         channels_mlp_dim=8, num_classes=2)
    plot_token_mixing(model, tmp_path / "units.png", max_pairs=max_pairs)  # laid out as it is written
    image = [ax for ax in figures[0].axes if ax.images][-1].images[0]
    mosaic, bar = image.axes.get_position(), image.colorbar.ax.get_position()
    assert (bar.y0, bar.y1) == pytest.approx((mosaic.y0, mosaic.y1), abs=1e-6)
    assert mosaic.x1 < bar.x0 < mosaic.x1 + 0.05  # just right of it


def test_plots_write_pngs(tmp_path):
    check_png(plot_token_mixing(tiny(), tmp_path / "units.png"))
    check_png(plot_token_mixing(tiny(), tmp_path / "one.png", blocks=[3], max_pairs=2))
    check_png(plot_stem(tiny(), tmp_path / "stem.png"))
    check_png(plot_stem(tiny(in_chans=1), tmp_path / "grey.png"))


def test_cli_show_weights(tmp_path, capsys):
    save_checkpoint(tiny(), tmp_path / "m.safetensors")
    out = tmp_path / "w.png"
    assert main(["show-weights", str(tmp_path / "m.safetensors"), "--out", str(out), "--block", "1"]) == 0
    check_png(out)
    assert main(["show-weights", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "s.png"), "--stem"]) == 0
    check_png(tmp_path / "s.png")
    assert main(["show-weights", str(tmp_path / "m.safetensors"), "--out", str(out), "--block", "7"]) == 2
    assert "Block 7 does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["show-weights", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps it
    assert "paired greedily (repeatedly the two unpaired units whose weights correlate most negatively)" in help_text
    assert "partner" not in help_text


def test_a_block_named_twice_is_drawn_once_and_counts_below_one_are_refused(tmp_path, monkeypatch):
    import mlpmixer.visualize as visualize

    figures = []
    monkeypatch.setattr(visualize, "save_figure", lambda fig, path: figures.append(fig) or path)
    plot_token_mixing(tiny(), tmp_path / "units.png", blocks=[0, 0, 2])  # --block 0 0 2 drew block 0 twice
    titles = [ax.get_title() for ax in figures[0].axes if ax.get_title().startswith("block")]
    assert [t.split(":")[0] for t in titles] == ["block 0", "block 2"]
    # max_pairs=0 was a ZeroDivisionError, -2 dropped the last two pairs without a word; max_kernels=0 divided by 0.
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"max_pairs is the number of pairs to draw per block, at least 1 .*not {bad}"):
            plot_token_mixing(tiny(), tmp_path / "units.png", max_pairs=bad)
    with pytest.raises(ValueError, match="max_kernels is the number of kernels to draw, at least 1"):
        plot_stem(tiny(), tmp_path / "stem.png", max_kernels=0)


def test_stem_with_unit_options_is_refused(tmp_path, capsys):
    """--block and --max-pairs were silently ignored with --stem, which draws every kernel."""
    save_checkpoint(tiny(), tmp_path / "m.safetensors")
    for extra in (["--block", "1"], ["--max-pairs", "2"]):
        out = tmp_path / "s.png"
        assert main(["show-weights", str(tmp_path / "m.safetensors"), "--out", str(out), "--stem", *extra]) == 2
        assert "which --stem does not draw" in capsys.readouterr().err and not out.exists()


def drawn_figure(monkeypatch, plot, *args, **kwargs):
    """The figure `plot` saves, drawn, and its renderer."""
    import mlpmixer.visualize as visualize
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figures = []
    monkeypatch.setattr(visualize, "save_figure", lambda fig, path: figures.append(fig) or path)
    plot(*args, **kwargs)
    renderer = FigureCanvasAgg(figures[0]).get_renderer()
    figures[0].draw(renderer)
    return figures[0], renderer


def test_rows_of_pairs_are_even(tmp_path, monkeypatch):
    # 12 pairs: two rows of 6, not 8 and 4 with half a row of gap colour that reads as missing units.
    torch.manual_seed(0)
    model = create_model("digits/4", img_size=(16, 16), hidden_dim=12, num_blocks=1, tokens_mlp_dim=24,
                         channels_mlp_dim=8, num_classes=2)
    fig, _ = drawn_figure(monkeypatch, plot_token_mixing, model, tmp_path / "units.png")
    mosaic = fig.axes[0].images[0].get_array()
    tile = 4  # the 4×4 patch grid
    rows = (mosaic.shape[0] + 1) // (tile + 1)
    pairs_a_row = (mosaic.shape[1] + 3) // (2 * tile + 1 + 3)  # a pair is two tiles and a gap, pairs 3 apart
    assert (rows, pairs_a_row) == (2, 6)


def test_one_channel_stem_has_a_centred_colour_bar_and_no_blank_band(tmp_path, monkeypatch):
    fig, renderer = drawn_figure(monkeypatch, plot_stem, tiny(in_chans=1), tmp_path / "stem.png")
    image = fig.axes[0].images[0]
    assert image.colorbar is not None and image.colorbar.ax.get_yticks().tolist() == [-1, 0, 1]
    assert image.norm.vmin == -image.norm.vmax  # zero (white, in a diverging map) in the middle
    # The title sits just above the mosaic: at most a quarter inch between them.
    gap = fig._suptitle.get_window_extent(renderer).y0 - image.axes.get_window_extent(renderer).y1
    assert gap <= 0.25 * fig.dpi


def test_stem_rows_are_even(tmp_path, monkeypatch):
    # 12 kernels of 4×4: two rows of 6, not 8 and 4.
    fig, _ = drawn_figure(monkeypatch, plot_stem, tiny(in_chans=1), tmp_path / "stem.png")
    assert fig.axes[0].images[0].get_array().shape == (2 * 5 - 1, 6 * 5 - 1)


def test_an_out_that_cannot_be_written_is_one_sentence_before_drawing(tmp_path, capsys, monkeypatch):
    """A place where no file can be created (/proc; a read-only folder) named the temporary file with an errno,
    after the drawing; a folder as --out was found only then."""
    import os

    import mlpmixer.visualize as visualize

    save_checkpoint(tiny(), tmp_path / "m.safetensors")
    monkeypatch.setattr(visualize, "plot_token_mixing", lambda *a, **k: pytest.fail("drawn before the check"))
    (tmp_path / "f").write_text("")
    cases = [(tmp_path, f"--out {tmp_path} is a folder; give the name of a file to write."),
             (tmp_path / "f" / "w.png", f"lies under {tmp_path / 'f'}, which is a file; give another --out.")]
    if os.path.isdir("/proc"):  # Linux's, where no file can be created (root passes os.access there)
        cases.append(("/proc/w.png", "--out /proc/w.png: no file can be created in /proc"))
    for out, said in cases:
        assert main(["show-weights", str(tmp_path / "m.safetensors"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1 and "Errno" not in err and ".tmp" not in err, err
