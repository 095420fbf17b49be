"""Variant names, configurations and the exact sizes of paper Table 1 (SPEC §2)."""

from __future__ import annotations

import json

import pytest
import torch

from mlpmixer import MixerConfig, PAPER_VARIANTS, create_model, variant_config
from mlpmixer.variants import canonical_name, name_img_size, paper_variant_of

# SPEC §2: exact counts with a 1000-class head (official tests / timm; H/14 from the formula).
EXACT_PARAMS = {
    "S/32": 19_104_624,
    "S/16": 18_528_264,
    "B/32": 60_293_428,
    "B/16": 59_880_472,
    "L/32": 206_939_264,
    "L/16": 208_196_168,
    "H/14": 432_350_952,
}
# Table 1: (N, P, C, S at 224, D_C, D_S).
TABLE_1 = {
    "S/32": (8, 32, 512, 49, 2048, 256),
    "S/16": (8, 16, 512, 196, 2048, 256),
    "B/32": (12, 32, 768, 49, 3072, 384),
    "B/16": (12, 16, 768, 196, 3072, 384),
    "L/32": (24, 32, 1024, 49, 4096, 512),
    "L/16": (24, 16, 1024, 196, 4096, 512),
    "H/14": (32, 14, 1280, 256, 5120, 640),
}


def built_params(config: MixerConfig) -> int:
    # On the meta device no memory is allocated, so even H/14 is built in milliseconds.
    with torch.device("meta"):
        model = create_model(config)
    return sum(p.numel() for p in model.parameters())


def test_seven_paper_variants_match_table_1() -> None:
    assert list(PAPER_VARIANTS) == list(TABLE_1)
    for name, (n, p, c, s, d_c, d_s) in TABLE_1.items():
        cfg = variant_config(name)
        assert (cfg.num_blocks, cfg.patch_size, cfg.hidden_dim, cfg.num_tokens) == (n, (p, p), c, s)
        assert (cfg.channels_mlp_dim, cfg.tokens_mlp_dim, cfg.img_size) == (d_c, d_s, (224, 224))
        assert cfg.gelu == "tanh" and cfg.num_classes == 1000


@pytest.mark.parametrize("name", list(TABLE_1))
def test_aliases_name_the_same_variant(name: str) -> None:
    family, patch = name.split("/")
    aliases = [name, f"Mixer-{name}", f"Mixer-{family}_{patch}", f"mixer_{family.lower()}{patch}_224",
               f"  mixer-{family.lower()}/{patch} "]
    assert {canonical_name(a) for a in aliases} == {name}
    assert {variant_config(a) for a in aliases} == {variant_config(name)}


def test_timm_name_carries_its_resolution() -> None:
    assert name_img_size("mixer_b16_448") == 448 and name_img_size("B/16") is None
    cfg = variant_config("mixer_b16_448")
    assert cfg.img_size == (448, 448) and cfg.num_tokens == 784
    with torch.device("meta"):
        assert create_model("mixer_s32_448", num_classes=0).config.num_tokens == 196


def test_extra_variants_are_built_for_their_small_images() -> None:
    """nano/4 is SPEC §3's CIFAR-10 model (32×32), the digits ones are for 28×28 MNIST; an img_size still
    overrides it."""
    for name, side, tokens in (("nano/4", 32, 64), ("digits/7", 28, 16), ("digits/4", 28, 49)):
        cfg = variant_config(name)
        assert cfg.img_size == (side, side) and cfg.num_tokens == tokens
    assert create_model("nano/4", img_size=64, num_classes=0).config.num_tokens == 256
    assert variant_config("mixer_nano4_64").img_size == (64, 64)


@pytest.mark.parametrize("bad", ["B/8", "Q/16", "resnet50", "", "mixer_b"])
def test_unknown_variant_lists_the_known_ones(bad: str) -> None:
    with pytest.raises(ValueError, match=r"Unknown Mixer variant.*S/32.*H/14"):
        variant_config(bad)


@pytest.mark.parametrize("name", list(EXACT_PARAMS))
def test_exact_parameter_counts(name: str) -> None:
    cfg = variant_config(name)
    assert cfg.num_params() == EXACT_PARAMS[name]
    assert built_params(cfg) == EXACT_PARAMS[name]


def test_h14_without_head() -> None:
    assert variant_config("H/14", num_classes=0).num_params() == 431_069_952
    # Table 1's rounded counts exclude the head: 431M for H/14, 59M for B/16, 18M for S/16.
    assert round(variant_config("B/16", num_classes=0).num_params() / 1e6) == 59
    assert round(variant_config("S/16", num_classes=0).num_params() / 1e6) == 18


@pytest.mark.parametrize("name", ["S/32", "S/16", "B/32"])
def test_formula_equals_the_built_count_with_other_heads(name: str) -> None:
    for classes in (0, 21843):
        cfg = variant_config(name, num_classes=classes)
        assert built_params(cfg) == cfg.num_params()


def test_formula_equals_a_real_cpu_model() -> None:
    cfg = variant_config("S/32")
    model = create_model(cfg).eval()
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params() == EXACT_PARAMS["S/32"]
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        assert model.forward_features(x).shape == (1, 49, 512)
        assert torch.count_nonzero(model(x)) == 0 and model(x).shape == (1, 1000)  # zero-initialised head


def test_formula_equals_built_count_for_custom_configs() -> None:
    custom = [
        MixerConfig(patch_size=(8, 4), hidden_dim=48, num_blocks=3, tokens_mlp_dim=20, channels_mlp_dim=96,
                    img_size=(32, 40), in_chans=1, num_classes=7),
        MixerConfig(patch_size=4, hidden_dim=16, num_blocks=1, tokens_mlp_dim=8, channels_mlp_dim=8,
                    img_size=(12, 28), num_classes=0),
    ]
    for cfg in custom:
        model = create_model(cfg)
        assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_macs_of_b16() -> None:
    # SPEC §2: Mixer-B/16 at 224 is 12.6 GMACs per image.
    assert round(variant_config("B/16").macs() / 1e9, 1) == 12.6
    cfg = variant_config("S/32")
    stem = 49 * 3 * 32 * 32 * 512
    blocks = 8 * (2 * 512 * 49 * 256 + 2 * 49 * 512 * 2048)
    assert cfg.macs() == stem + blocks + 512 * 1000


def test_custom_config_fields_and_validation() -> None:
    cfg = variant_config("B/16", img_size=(224, 320), in_chans=1, num_classes=3)
    assert cfg.grid == (14, 20) and cfg.num_tokens == 280 and cfg.name == "B/16"
    assert variant_config("B/16", hidden_dim=64).name == ""  # no longer the named variant
    assert paper_variant_of(variant_config("L/16", img_size=448)) == "L/16"
    assert paper_variant_of(variant_config("L/16", hidden_dim=64)) is None
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        MixerConfig(img_size=(224, 100))
    with pytest.raises(ValueError, match="gelu must be"):
        MixerConfig(gelu="relu")
    with pytest.raises(ValueError, match="num_classes"):
        MixerConfig(num_classes=-1)
    # Sizes that divide but make no image: no tokens, or a "grid" of negative size.
    for size in (0, -32):
        with pytest.raises(ValueError, match="smaller than the patch"):
            MixerConfig(img_size=size, patch_size=32)
    with pytest.raises(ValueError, match="patch_size must be at least 1"):
        MixerConfig(patch_size=0)
    # Values that would fail later, deep in torch, with its own words.
    for field, value, said in (("hidden_dim", 512.5, "hidden_dim must be a whole number"),
                               ("num_classes", True, "num_classes must be 0"),
                               ("drop_rate", 2.0, "drop_rate must be a number from 0 to 1"),
                               ("drop_rate", "0.1", "drop_rate must be a number from 0 to 1, not '0.1'"),
                               ("drop_path_rate", -1.0, "drop_path_rate must be a number from 0 to 1")):
        with pytest.raises(ValueError, match=said):
            MixerConfig(**{field: value})
    import numpy as np

    assert MixerConfig(img_size=np.int64(224), hidden_dim=np.int64(768)).img_size == (224, 224)
    assert MixerConfig(img_size=(np.int64(224), 288)).img_size == (224, 288)
    for size in ((448,), 224.5, (224.5, 224), "224", (224, 224, 3), True):
        with pytest.raises(ValueError, match="A size is a whole number or a \\(height, width\\) pair"):
            MixerConfig(img_size=size)
    from mlpmixer import resize_to

    with pytest.raises(ValueError, match="not \\(448,\\)"):
        resize_to(create_model("S/32", num_classes=0), (448,))


def test_config_dict_round_trip() -> None:
    cfg = variant_config("S/16", img_size=(224, 288), gelu="exact", in_chans=1, drop_path_rate=0.1)
    again = MixerConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.img_size == (224, 288)
    with pytest.raises(ValueError, match="Unknown Mixer configuration fields"):
        MixerConfig.from_dict({**cfg.to_dict(), "heads": 12})
    # Saved before proj_drop_rate existed, drop_rate was dropout in the MLPs too: it still is for that config.
    old = {k: v for k, v in cfg.replace(drop_rate=0.1).to_dict().items() if k != "proj_drop_rate"}
    assert (MixerConfig.from_dict(old).drop_rate, MixerConfig.from_dict(old).proj_drop_rate) == (0.1, 0.1)
    assert MixerConfig.from_dict(cfg.replace(drop_rate=0.1).to_dict()).proj_drop_rate == 0.0


def test_info_command_prints_table_1(capsys: pytest.CaptureFixture) -> None:
    from mlpmixer.cli import main

    assert main(["info", "--json"]) == 0
    rows = {r["variant"].removeprefix("Mixer-"): r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == list(TABLE_1)
    for name, (n, p, c, s, d_c, d_s) in TABLE_1.items():
        r = rows[name]
        assert (r["layers"], r["patch"], r["C"], r["S"], r["D_C"], r["D_S"]) == (n, p, c, s, d_c, d_s)
        assert r["params"] == EXACT_PARAMS[name]
    assert main(["info", "--img-size", "448", "--num-classes", "0"]) == 0
    out = capsys.readouterr().out
    assert f"{variant_config('H/14', img_size=448, num_classes=0).num_params():,}" in out
    assert "no head" in out and "448×448" in out and "`mixer resize` of a 224 checkpoint" in out
    assert main(["info", "--img-size", "448", "224"]) == 2
    assert "give one --img-size" in capsys.readouterr().err
    # A variant name, where no file of that name exists: its row alone.
    assert main(["info", "mixer_s16_224", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["variant"] == "Mixer-S/16" and row["params"] == EXACT_PARAMS["S/16"]
    # An extra variant's row is at its own size, a timm name's at the size it carries.
    assert main(["info", "nano/4"]) == 0
    out = capsys.readouterr().out
    assert f"{variant_config('nano/4').num_params():,}" in out and "at 32×32" in out
    assert main(["info", "mixer_b16_448", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["img_size"], row["S"]) == (448, 784)
    # A misspelt name is not taken for a missing file.
    assert main(["info", "X/9"]) == 2
    assert "X/9 is neither a checkpoint nor a Mixer variant" in capsys.readouterr().err
