"""`mixer finetune --img-size N` (or H W): the checkpoint is converted with resize_to and trained at that size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mlpmixer import create_model, load_checkpoint, resize_to, save_checkpoint
from mlpmixer.cli import main

FINETUNE = ["--data", "mnist5k", "--holdout", "50", "--steps", "2", "--batch-size", "16", "--quiet"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random digits Mixer at 28×28 (a 4×4 grid of 7×7 patches, D_S = 8)."""
    torch.manual_seed(0)
    model = create_model("digits/4", num_classes=10, img_size=28, in_chans=1, patch_size=7, hidden_dim=16,
                         tokens_mlp_dim=8, channels_mlp_dim=32)
    model.class_names = [str(i) for i in range(10)]
    return save_checkpoint(model, tmp_path_factory.mktemp("ft") / "tiny.safetensors")


def test_finetune_at_twice_the_size_uses_the_block_diagonal_conversion(tiny: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ft56"
    # lr 0: the weights stay as converted, so they can be compared with resize_to's.
    assert main(["finetune", "--from", str(tiny), "--img-size", "56", "--lr", "0", "--out", str(out), *FINETUNE]) == 0
    what = load_checkpoint(out).config
    assert (f"Fine-tuning {what.describe()} ({what.num_params():,} parameters) from {tiny} (a new "
            "zero-initialised head; converted from 28×28 to 56×56 by blockdiag) on mnist5k") in capsys.readouterr().out
    model = load_checkpoint(out)
    assert model.config.img_size == (56, 56) and model.config.tokens_mlp_dim == 4 * 8
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["img_size"] == [56, 56] and config["recipe"]["resize_method"] == "blockdiag"
    expected = resize_to(load_checkpoint(tiny), 56).state_dict()
    got = model.state_dict()
    for key in expected:
        if not key.startswith("head."):  # the head is new (zero-initialised) by design
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    # The validation ran on 56×56 inputs (a 28×28 batch would not fit the 64-token model).
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("val_n") == 50 for m in metrics)


def test_a_resized_variant_is_recorded_under_its_name(tmp_path: Path) -> None:
    """Converted to a larger size its token MLPs are wider than any variant's: config.json named the preset's
    digits/4 with digits/7's shapes as model_args, where the run's model is digits/7's (as its name says)."""
    ckpt = save_checkpoint(create_model("digits/7", num_classes=10, in_chans=1), tmp_path / "d7.safetensors")
    assert main(["finetune", "--from", str(ckpt), "--img-size", "56", "--out", str(tmp_path / "ft"), *FINETUNE]) == 0
    recipe = json.loads((tmp_path / "ft" / "config.json").read_text())["recipe"]
    assert (recipe["model"], recipe["model_args"], recipe["img_size"]) == ("digits/7", {"tokens_mlp_dim": 4 * 24}, 56)


def test_finetune_to_height_and_width_is_recorded_for_train_config(tiny: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """--img-size H W converts to a rectangle, and config.json records [H, W]: it recorded no size (null), so
    `mixer train --config` built the widened token MLPs on the data's 28×28 grid without a word."""
    out = tmp_path / "ft56x84"
    assert main(["finetune", "--from", str(tiny), "--img-size", "56", "84", "--out", str(out), *FINETUNE]) == 0
    model = load_checkpoint(out)
    assert model.config.img_size == (56, 84) and model.config.tokens_mlp_dim == 6 * 8
    recipe = json.loads((out / "config.json").read_text())["recipe"]
    assert recipe["img_size"] == [56, 84]
    again = tmp_path / "again"
    with pytest.warns(UserWarning, match="is a fine-tuning run's"):
        assert main(["train", "--config", str(out / "config.json"), "--steps", "1", "--out", str(again),
                     "--quiet"]) == 0
    assert load_checkpoint(again).config == model.config
    capsys.readouterr()
    assert main(["finetune", "--from", str(tiny), "--img-size", "56", "84", "7", "--out", str(tmp_path / "x"),
                 *FINETUNE]) == 2
    assert "--img-size takes N or H W, not 3 numbers." in capsys.readouterr().err
    (tmp_path / "c.json").write_text(json.dumps({"img_size": [56, 0]}))
    assert main(["finetune", "--from", str(tiny), "--config", str(tmp_path / "c.json"), "--out",
                 str(tmp_path / "y"), *FINETUNE]) == 2
    assert ("--img-size must be a whole number of at least 1, or two of them (height and width), not [56, 0]."
            in capsys.readouterr().err)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_finetune_without_img_size_keeps_the_checkpoint_size(tiny: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ft28"
    assert main(["finetune", "--from", str(tiny), "--out", str(out), "--save-every", "2", *FINETUNE]) == 0
    model = load_checkpoint(out)
    assert model.config.img_size == (28, 28) and model.config.tokens_mlp_dim == 8
    config = json.loads((out / "config.json").read_text())
    assert config["init_from"] == str(tiny)
    # Its recipe names the model fine-tuned (no variant's: digits/4 with other shapes), so that mixer train builds it.
    assert (config["recipe"]["model"], config["recipe"]["model_args"], config["recipe"]["img_size"]) == \
        ("digits/4", {"patch_size": [7, 7], "hidden_dim": 16, "tokens_mlp_dim": 8, "channels_mlp_dim": 32}, 28)
    again = tmp_path / "again"
    # It builds the model from scratch: said, with the way to fine-tune it again.
    with pytest.warns(UserWarning, match=f"is a fine-tuning run's, from {tiny}; mixer train builds its model from "
                                         f"scratch \\(to fine-tune from there again: mixer finetune --config"):
        assert main(["train", "--config", str(out / "config.json"), "--steps", "1", "--out", str(again),
                     "--quiet"]) == 0
    assert load_checkpoint(again).config == model.config
    # Resumed by `mixer train`, which would build another model and optimiser: one sentence naming the way.
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 2
    assert (f"fine-tunes {tiny}; resume it with its own settings: mixer finetune --config {out / 'config.json'} "
            f"--from {tiny} --out {out} --resume.") in capsys.readouterr().err
    # A run whose recipe holds the recipe's default model (as before it named the model fine-tuned) resumes
    # without a note of other settings: the checkpoint decides the model.
    config["recipe"].update(model="digits/4", model_args={}, img_size=None)
    (out / "config.json").write_text(json.dumps(config))
    assert main(["finetune", "--from", str(tiny), "--out", str(out), "--save-every", "2", "--resume", *FINETUNE]) == 0
    assert "Resuming with settings other" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:  # the model is the checkpoint's: finetune has no --model
        main(["finetune", "--from", str(tiny), "--model", "S/16", "--out", str(tmp_path / "s16"), *FINETUNE])
    assert stop.value.code == 2
    assert "unrecognized arguments: --model" in capsys.readouterr().err and not (tmp_path / "s16").exists()


def test_finetune_with_another_preset_keeps_the_checkpoint_size(tiny: Path, tmp_path: Path) -> None:
    """cifar10-nano trains new models at 32×32; as a fine-tuning recipe its size is not a request to convert the
    28×28 checkpoint (which 32 is no multiple of): only --img-size, or an img_size in --config, asks for one."""
    out = tmp_path / "nano-recipe"
    assert main(["finetune", "--from", str(tiny), "--recipe", "cifar10-nano", "--out", str(out), *FINETUNE]) == 0
    assert load_checkpoint(out).config.img_size == (28, 28)
    config = tmp_path / "size.json"
    config.write_text(json.dumps({"img_size": 56}))
    out = tmp_path / "config-size"
    assert main(["finetune", "--from", str(tiny), "--recipe", "cifar10-nano", "--config", str(config),
                 "--out", str(out), *FINETUNE]) == 0
    assert load_checkpoint(out).config.img_size == (56, 56)


def test_a_resize_method_without_a_size_is_said(tiny: Path, tmp_path: Path) -> None:
    """It was taken without a word (and recorded), the model kept at its own size."""
    with pytest.warns(UserWarning, match="--resize-method resample converts the checkpoint to --img-size, which is "
                                         "not given: the model keeps its own size."):
        assert main(["finetune", "--from", str(tiny), "--resize-method", "resample", "--out", str(tmp_path / "r"),
                     *FINETUNE]) == 0
    assert load_checkpoint(tmp_path / "r").config.img_size == (28, 28)


def test_finetune_resample_takes_any_multiple_of_the_patch(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft42"
    assert main(["finetune", "--from", str(tiny), "--img-size", "42", "--resize-method", "resample",
                 "--out", str(out), *FINETUNE]) == 0
    model = load_checkpoint(out)
    assert model.config.img_size == (42, 42) and model.config.tokens_mlp_dim == 8  # resampling keeps D_S


def test_finetune_to_a_non_integer_factor_is_one_sentence(tiny: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ft42"
    assert main(["finetune", "--from", str(tiny), "--img-size", "42", "--out", str(out), *FINETUNE]) != 0
    err = capsys.readouterr().err
    assert "not an integer multiple" in err and "resample" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (out / "model.safetensors").exists()
