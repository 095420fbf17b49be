"""`mixer train`, `mixer predict`, `mixer recipes` and `mixer finetune` through the CLI entry point."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlpmixer import create_model, load_checkpoint, save_checkpoint
from mlpmixer.cli import build_parser, main
from mlpmixer.commands.train import RECIPE_FLAGS, add_training_flags, recipe_from_args, recipe_overrides
from mlpmixer.data import load_mnist5k
from mlpmixer.recipes import get_recipe
from mlpmixer.transforms import eval_transform


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--steps", "3", "--batch-size", "32", "--out", str(out), "--quiet"]) == 0
    return out


def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def spy_on_curve_labels(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """The legend labels each run draws curves.png with (train imports plot_curves when it draws)."""
    import mlpmixer.plots as plots

    drawn, draw = [], plots.plot_curves
    monkeypatch.setattr(plots, "plot_curves", lambda metrics, png, *labels: drawn.append(labels) or draw(metrics, png, *labels))
    return drawn


def test_train_prints_where_everything_went(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = spy_on_curve_labels(monkeypatch)
    out = tmp_path / "again"
    assert main(["train", "--steps", "2", "--batch-size", "16", "--lr", "0.001", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    for name in ("model.safetensors", "config.json", "metrics.jsonl", "curves.png"):
        assert str(out / name) in printed and (out / name).is_file()
    recipe = json.loads((out / "config.json").read_text())["recipe"]
    assert recipe["lr"] == 0.001 and recipe["steps"] == 2 and recipe["batch_size"] == 16
    assert load_checkpoint(run_dir).config.in_chans == 1
    assert drawn == [("training (as optimised: rotations, zooms, shifts, elastic warps, label-smoothed loss)",
                      "validation")]


def test_predict_a_digit_by_class_name(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    digit = load_mnist5k().images[0, 0].numpy()
    image = _png(tmp_path / "digit.png", digit)
    assert main(["predict", str(run_dir), str(image), "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert [t["class"] for t in out["top"]] != [] and len(out["top"]) == 5
    assert {t["class"] for t in out["top"]} <= {str(i) for i in range(10)}
    assert sum(t["prob"] for t in out["top"]) <= 1 + 1e-6 and out["notes"] == []
    assert captured.err == ""


def test_predict_takes_images_after_options(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = _png(tmp_path / "digit.png", load_mnist5k().images[0, 0].numpy())
    assert main(["predict", str(run_dir), "--top", "2", str(image), str(image)]) == 0
    assert capsys.readouterr().out.count("  1. ") == 2
    with pytest.raises(SystemExit):  # anything else left over is still an error
        main(["predict", str(run_dir), str(image), "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_predict_converts_mode_and_size_and_says_so(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rgb = _png(tmp_path / "rgb.png", np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8))
    assert main(["predict", str(run_dir), str(rgb)]) == 0
    captured = capsys.readouterr()
    assert "converted RGB to greyscale" in captured.err
    assert "resized 40×36 (height×width) to the model's 28×28" in captured.err
    assert captured.out.count("\n") == 6  # the file name and five classes
    # ... and greyscale into an RGB model.
    model = create_model("digits/4", num_classes=3, img_size=28, in_chans=3, patch_size=7)
    torch.nn.init.normal_(model.head.weight)
    model.class_names = ["cat", "dog", "bird"]
    save_checkpoint(model, tmp_path / "rgb.safetensors")
    grey = _png(tmp_path / "grey.png", np.zeros((28, 28), dtype=np.uint8))
    assert main(["predict", str(tmp_path / "rgb.safetensors"), str(grey)]) == 0
    captured = capsys.readouterr()
    assert "converted greyscale to RGB" in captured.err and "resized" not in captured.err
    assert all(name in captured.out for name in ("cat", "dog", "bird"))


def test_predict_bad_images(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    assert main(["predict", str(run_dir), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "broken.png is not a readable image" in err and "Traceback" not in err and err.count("\n") == 1
    assert main(["predict", str(run_dir), str(tmp_path / "absent.png")]) == 2
    assert "No image at" in capsys.readouterr().err
    assert main(["predict", str(run_dir)]) == 2
    assert "at least one image" in capsys.readouterr().err
    assert main(["predict", "--model", "B/16", "--pretrained", "imagenet1k"]) == 2  # said before any download
    assert "Give at least one image" in capsys.readouterr().err
    assert main(["predict", str(run_dir), str(tmp_path)]) == 2
    assert "is a folder; give its image files" in capsys.readouterr().err
    assert main(["predict", str(run_dir), str(tmp_path / "*.png")]) == 2
    assert "leave the pattern unquoted" in capsys.readouterr().err
    # Among good images, a bad one is named and the others are still classified.
    good = _png(tmp_path / "digit.png", load_mnist5k().images[0, 0].numpy())
    assert main(["predict", str(run_dir), str(good), str(bad), str(good), "--json"]) == 2
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["image"] for r in rows] == [str(good), str(bad), str(good)]
    assert len(rows[0]["top"]) == len(rows[2]["top"]) == 5 and "not a readable image" in rows[1]["error"]
    assert captured.err.count("\n") == 1 and "broken.png is not a readable image" in captured.err


def test_predict_huge_images(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An image past PIL's decompression-bomb limit (here lowered to 100 pixels) that torchvision decodes (an
    opaque PNG) is classified, not a traceback from the second look at its header; one that PIL would have to
    decode (with transparency) is one sentence saying it is too large, not "damaged or truncated"."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    digit = load_mnist5k().images[0, 0].numpy()  # 784 pixels, past twice the limit
    opaque = _png(tmp_path / "opaque.png", digit)
    transparent = tmp_path / "transparent.png"
    Image.fromarray(digit).convert("RGBA").save(transparent)
    assert main(["predict", str(run_dir), str(opaque), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["top"]) == 5
    assert main(["predict", str(run_dir), str(transparent)]) == 2
    err = capsys.readouterr().err
    assert "transparent.png is too large: 784 pixels, more than PIL decodes" in err and "damaged" not in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert Image.MAX_IMAGE_PIXELS == 100  # restored after the header's look


def test_a_model_without_a_head_says_how_to_get_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    headless = save_checkpoint(create_model("digits/4", num_classes=0, img_size=28, in_chans=1, patch_size=7),
                               tmp_path / "headless.safetensors")
    image = _png(tmp_path / "digit.png", load_mnist5k().images[0, 0].numpy())
    for argv in (["predict", str(headless), str(image)], ["eval", str(headless), "--data", "mnist5k"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "no classification head" in err and "mixer finetune --from" in err and "mixer fewshot" in err
        assert err.count("\n") == 1


def test_predict_reads_16_bit_greyscale_as_training_does(run_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    digit = load_mnist5k().images[0, 0].numpy()
    eight = _png(tmp_path / "eight.png", digit)
    Image.fromarray(digit.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # the same picture, 16-bit
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    assert main(["predict", str(run_dir), str(eight), str(tmp_path / "sixteen.png"), "--json"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert rows[0]["top"] == rows[1]["top"] and "top 8 bits" in captured.err  # not a white image


def test_predict_prepares_images_as_eval_does(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The run's evaluation preprocessing (here resmall-crop, the ImageNet recipes'), or --eval-mode's."""
    model = create_model("digits/4", num_classes=3, img_size=28, in_chans=3, patch_size=7)
    torch.nn.init.normal_(model.head.weight)
    run = tmp_path / "run"
    save_checkpoint(model, run / "model.safetensors")
    (run / "config.json").write_text(json.dumps({"model": {}, "recipe": {"eval_mode": "resmall-crop"}}))
    image = _png(tmp_path / "wide.png", np.random.default_rng(0).integers(0, 256, (30, 60, 3), dtype=np.uint8))
    pixels = torch.from_numpy(np.array(Image.open(image))).permute(2, 0, 1)

    def probs(mode: str) -> list[float]:
        with torch.no_grad():
            p = model.eval()(eval_transform(28, 3, mode)(pixels)[None]).softmax(-1)[0]
        return sorted(p.tolist(), reverse=True)

    assert probs("resize") != pytest.approx(probs("resmall-crop"), abs=1e-4)  # the two differ on this image
    for flags, mode in (([], "resmall-crop"), (["--eval-mode", "resize"], "resize")):
        assert main(["predict", str(run), str(image), "--json", *flags]) == 0
        captured = capsys.readouterr()
        assert [t["prob"] for t in json.loads(captured.out)["top"]] == pytest.approx(probs(mode), abs=1e-6)
        assert ("cropped its centre" in captured.err) == (mode == "resmall-crop")


def test_predict_decodes_as_training_does(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Upright as the EXIF orientation says, and transparent pixels over white: the same pixels as a plain file."""
    digit = load_mnist5k().images[0, 0].numpy()
    plain = _png(tmp_path / "plain.png", digit)
    exif = Image.Exif()
    exif[0x0112] = 8  # shown turned 90° anticlockwise
    Image.fromarray(np.rot90(digit, -1)).save(tmp_path / "turned.png", exif=exif.tobytes())
    ink = Image.fromarray(np.zeros_like(digit)).convert("LA")  # black under every pixel, the digit in the alpha
    ink.putalpha(Image.fromarray(digit))
    ink.save(tmp_path / "ink.png")
    images = [str(plain), str(tmp_path / "turned.png"), str(tmp_path / "ink.png")]
    assert main(["predict", str(run_dir), *images, "--json", "--top", "10"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert rows[0]["top"] == rows[1]["top"] and "turned upright" in captured.err
    white_digit = _png(tmp_path / "white.png", 255 - digit)  # the ink picture's look: black on white
    assert main(["predict", str(run_dir), str(white_digit), "--json", "--top", "10"]) == 0
    assert json.loads(capsys.readouterr().out)["top"] == rows[2]["top"] and "over white" in captured.err


def test_predict_says_it_composited_only_where_a_pixel_is_transparent(tmp_path: Path) -> None:
    """An RGBA image opaque everywhere (as screenshots and many exports are), or a palette image whose
    transparent index no pixel uses, was said to have had its transparent pixels composited over white."""
    from mlpmixer.commands.predict import load_image

    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    opaque = Image.fromarray(pixels).convert("RGBA")  # alpha 255 everywhere
    opaque.save(tmp_path / "opaque.png")
    opaque.putpixel((0, 0), (0, 0, 0, 0))
    opaque.save(tmp_path / "transparent.png")
    Image.fromarray(pixels[..., 0] % 4).convert("P").save(tmp_path / "palette.png", transparency=200)  # index unused
    for name, composited in (("opaque.png", False), ("transparent.png", True), ("palette.png", False)):
        _, notes = load_image(str(tmp_path / name), 3)
        assert ("composited its transparent pixels over white" in notes) == composited, (name, notes)
    assert "read mode RGBA as RGB" in load_image(str(tmp_path / "opaque.png"), 3)[1]  # what did happen is said
    # An invalid EXIF orientation (0, 9, 255) leaves the pixels as they are, and is not said to have turned them.
    exif = Image.Exif()
    for value in (0, 9):
        exif[0x0112] = value
        Image.fromarray(pixels).save(tmp_path / f"orientation{value}.png", exif=exif.tobytes())
        image, notes = load_image(str(tmp_path / f"orientation{value}.png"), 3)
        assert torch.equal(image[0], torch.from_numpy(pixels).permute(2, 0, 1))
        assert not any("turned" in n for n in notes)


def test_predict_refuses_a_named_pipe_without_waiting(run_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """A pipe named like an image made predict say there was no image there (and a folder's reader wait for ever)."""
    os.mkfifo(tmp_path / "pipe.png")
    assert main(["predict", str(run_dir), str(tmp_path / "pipe.png")]) == 2
    assert "pipe.png is not a regular file (a pipe, socket or device); give an image file." in capsys.readouterr().err


def test_train_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--data", str(tmp_path / "nothing"), "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "nothing" in err and "Traceback" not in err
    assert main(["train", "--steps", "1", "--batch-size", "10000", "--out", str(tmp_path / "r2")]) == 2
    assert "larger than the 4750 training images" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(tmp_path / "fresh")]) == 2
    assert "no saved training state" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "--recipe", "paper-s-jft"], ["train", "--data", ""],
                                  ["train", "--recipe", "finetune", "--steps", "1"], ["finetune", "--from", "nowhere"]])
def test_no_data_is_one_sentence_asking_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture, argv: list[str]) -> None:
    """The paper and finetune presets name no data: without --data (or with --data ""), Path("") trained on the
    current folder."""
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--out", "run", "--quiet"]) == 2
    verb = "fine-tune" if argv[0] == "finetune" else "train"
    assert capsys.readouterr().err == (f"mixer {argv[0]}: error: Give the data to {verb} on with --data (an image "
                                       "folder, shards, an IDX folder or mnist5k).\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config, said", [
    ('{"recipe": "x"}', 'config.json cannot be read (its "recipe" is not a JSON object)'),
    ('{"recipe": [1]}', 'config.json cannot be read (its "recipe" is not a JSON object)'),
    ('{"recipe": {"permute": 3}}', "records no valid permutation (permute 3, seed None); restore its config.json"),
    ("{", "config.json cannot be read (Expecting property name"),
])
def test_eval_names_a_malformed_run_config(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                           config: str, said: str) -> None:
    (tmp_path / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(config)
    assert main(["eval", str(tmp_path), "--data", "mnist5k"]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err


def test_info_names_a_training_state_and_reads_its_run_configuration(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """RUN/checkpoints/step-N.pt holds weights in timm's names, but its configuration is RUN/config.json's: a
    tanh-GELU model (digits/4), which the shapes alone would take for timm's exact GELU."""
    run = tmp_path / "run"
    assert main(["train", "--model", "digits/4", "--steps", "2", "--batch-size", "16", "--save-every", "2",
                 "--threads", "1", "--processes", "1", "--out", str(run), "--quiet"]) == 0
    state = run / "checkpoints" / "step-00000002.pt"
    capsys.readouterr()
    assert main(["info", str(state)]) == 0
    out = capsys.readouterr().out
    assert f"layout      training state of mixer train, configured by {run / 'config.json'}" in out
    assert "tanh GELU" in out and "class names 0, 1, 2" in out and "timm" not in out
    assert main(["info", str(state), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "training state" and info["config"] == load_checkpoint(run).config.to_dict()
    # Taken out of its run, it is still named, and what is assumed is said.
    (tmp_path / "loose.pt").write_bytes(state.read_bytes())
    assert main(["info", str(tmp_path / "loose.pt")]) == 0
    out = capsys.readouterr().out
    assert "layout      training state, weights only: the GELU is assumed exact (no config.json of its run)" in out


def test_an_out_path_that_cannot_be_a_run_folder_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "f"
    file.write_text("")
    flags = ["train", "--steps", "1", "--batch-size", "32", "--processes", "1", "--quiet", "--out"]
    assert main([*flags, str(file)]) == 2
    assert f"--out {file} is a file; give the path of a folder." in capsys.readouterr().err
    assert main([*flags, str(file / "a" / "b")]) == 2
    assert f"--out {file}/a/b lies under {file}, which is a file; give" in capsys.readouterr().err
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)  # as a read-only folder (root is not refused)
    assert main([*flags, str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is not writable for this user; give another --out" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    monkeypatch.undo()
    # In the processes that one `mixer train` forks (the default job's two), the main process's own error names
    # no ranks: the user asked for none.
    assert main([*flags[:5], "--processes", "2", "--quiet", "--out", str(file)]) == 2
    assert capsys.readouterr().err == f"mixer train: error: --out {file} is a file; give the path of a folder.\n"


def test_a_closed_pipe_stops_the_command_quietly(child_env: dict) -> None:
    # The reader is gone before the command writes (`mixer info | head -0`): no error message, status 141.
    proc = subprocess.Popen([sys.executable, "-m", "mlpmixer", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=child_env)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == b""


def test_recipes_command(capsys: pytest.CaptureFixture) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("mnist5k", "cifar10-nano", "imagenette-s16", "finetune", "paper-b-in1k"):
        assert f"{name}" in out
    assert main(["recipes", "finetune"]) == 0
    assert json.loads(capsys.readouterr().out)["optimizer"] == "sgd"


@pytest.mark.parametrize("argv, message", [
    (["eval", "RUN", "--data", "mnist5k", "--batch-size", "0"], "argument --batch-size: must be at least 1, not 0"),
    (["eval", "RUN", "--data", "mnist5k", "--workers", "-1"], "argument --workers: must be at least 0, not -1"),
    (["eval", "RUN", "--data", "mnist5k", "--workers", "5000"], "argument --workers: must be at most 64, not 5000"),
    (["fewshot", "RUN", "--data", "mnist5k", "--workers", "65"], "argument --workers: must be at most 64, not 65"),
    (["linear-probe", "RUN", "--data", "mnist5k", "--workers", "5000"], "argument --workers: must be at most 64"),
    (["fewshot", "RUN", "--data", "mnist5k", "--batch-size", "x"], "argument --batch-size: must be a whole number, not 'x'"),
    (["linear-probe", "RUN", "--data", "mnist5k", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["predict", "--top", "0", "RUN", "IMAGE"], "argument --top: must be at least 1, not 0"),
    (["show-weights", "RUN", "--max-pairs", "0"], "argument --max-pairs: must be at least 1, not 0"),
    (["bench", "--batch-size", "0"], "argument --batch-size: must be at least 1, not 0"),
    (["bench", "--warmup", "-1"], "argument --warmup: must be at least 0, not -1"),
    (["info", "--img-size", "0"], "argument --img-size: must be at least 1, not 0"),
    (["info", "--num-classes", "-1"], "argument --num-classes: must be at least 0, not -1"),
    (["resize", "RUN", "--img-size", "-28", "--out", "x.safetensors"], "argument --img-size: must be at least 1"),
    (["convert", "RUN", "x.safetensors", "--img-size", "0"], "argument --img-size: must be at least 1, not 0"),
    (["train", "--save-every", "-5"], "argument --save-every: must be at least 0, not -5"),
    (["train", "--keep", "-1"], "argument --keep: must be at least 0, not -1"),
    (["train", "--profile", "-3"], "argument --profile: must be at least 0, not -3"),
])
def test_command_counts_out_of_range_are_one_line(run_dir: Path, capsys: pytest.CaptureFixture, argv: list[str],
                                                  message: str) -> None:
    with pytest.raises(SystemExit) as exit:  # argparse's own error: usage, then one line
        main([str(run_dir) if a == "RUN" else a for a in argv])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--img-size", "0"], "--img-size must be a whole number of at least 1, or two of them (height and width), not 0."),
    (["--batch-size", "0"], "--batch-size must be a whole number of at least 1, not 0."),
    (["--accum", "0"], "--accum must be a whole number of at least 1"),
    (["--steps", "-5"], "--steps must be a whole number from 1 to 99,999,999, not -5."),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--epochs", "inf"], "--epochs must be positive and finite, not inf."),
    (["--warmup", "inf"], "--warmup must be zero or more, and finite, not inf."),
    (["--lr", "nan"], "--lr must be zero or more, and finite, not nan."),
    (["--steps", "100000000"], "--steps must be a whole number from 1 to 99,999,999, not 100000000."),
    (["--epochs", "1e300"], "--epochs 1e+300 of 37 steps each make more than the 99,999,999 steps a run can have"),
    (["--lr", "-1"], "--lr must be zero or more"),
    (["--workers", "5000"], "--workers must be a whole number from 0 to 64, not 5000."),
    (["--mix-prob", "3"], "--mix-prob must be from 0 to 1, not 3.0."),
    (["--label-smoothing", "1"], "--label-smoothing must be at least 0 and below 1"),
    (["--holdout", "2.5"], "--holdout must be a fraction below 1 or a whole count"),
    (["--holdout", "-5"], "--holdout must be a fraction below 1 or a whole count"),
    (["--randaugment", "40"], "--randaugment must be a whole magnitude from 0 to 30"),
    (["--crop-area", "0.5", "0.2"], "--crop-area must be two area fractions, 0 < low <= high <= 1"),
    (["--betas", "0.9", "1.0"], "--betas must be two decays"),
    (["--schedule", "step"], "--schedule must be one of cosine, linear, not 'step'."),
    (["--loss", "hinge"], "--loss must be one of softmax, sigmoid, not 'hinge'."),
    (["--optimizer", "lamb"], "--optimizer must be one of adamw, adam, sgd, not 'lamb'."),
    (["--augment-on", "gpu"], "--augment-on must be one of workers, device, not 'gpu'."),
    (["--eval-mode", "crop"], "--eval-mode must be one of resize, resmall-crop, not 'crop'."),
    (["--autoaugment", "cifar100"], "--autoaugment must be one of imagenet, cifar10, svhn, not 'cifar100'."),
    (["--autoaugment", "svhn", "--randaugment", "3"], "--randaugment and --autoaugment (randaugment and autoaugment in a config file) are alternatives; give one of them."),
    # torch takes no seed past 2**64 - 1 ("Overflow when unpacking long long"), and seeds are derived modulo 2**63:
    # 2**63 trained exactly as seed 0, and -1 as 2**63 - 1.
    (["--seed", "99999999999999999999"], "--seed must be a whole number from 0 to 9,223,372,036,854,775,807, not "
                                         "99999999999999999999."),
    (["--seed", str(2 ** 63)], "--seed must be a whole number from 0 to 9,223,372,036,854,775,807"),
    (["--seed", "-1"], "--seed must be a whole number from 0 to 9,223,372,036,854,775,807, not -1."),
])
def test_settings_out_of_range_are_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str],
                                                message: str) -> None:
    assert main(["train", *flags, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fields, message", [
    ({"batch_size": "512"}, "--batch-size must be a whole number of at least 1, not '512'."),
    ({"betas": 0.9}, "--betas must be two decays, each at least 0 and below 1, not 0.9."),
    ({"bf16": "no"}, "--bf16 must be true or false, not 'no'."),
    ({"seed": "abc"}, "--seed must be a whole number from 0 to 9,223,372,036,854,775,807, not 'abc'."),
    ({"model_args": {"hiden_dim": 3}}, "model_args must be MixerConfig fields ("),
    ({"digits_aug": {"rotat": 3}}, "digits_aug has unknown settings ['rotat']; augment_digits takes rotate,"),
    # Each of these was a traceback (IndexError, AttributeError, TypeError) or ran with a setting it could not use.
    ({"betas": [0.9]}, "--betas must be two decays, each at least 0 and below 1, not (0.9,)."),
    ({"betas": [0.9, 0.99, 0.9]}, "--betas must be two decays"),
    ({"crop_area": [0.1]}, "--crop-area must be two area fractions, 0 < low <= high <= 1, not (0.1,)."),
    ({"model": 5}, "--model must be a variant's name, such as S/16 (`mixer info` lists them), not 5."),
    ({"data": 5}, "--data must be a path or mnist5k, as a string, not 5."),
    ({"eval_data": 3}, "--eval-data must be a path or mnist5k, as a string, not 3."),
    ({"lr": None}, "--lr must be zero or more, and finite, not None."),
    ({"batch_size": None}, "--batch-size must be a whole number of at least 1, not None."),
    ({"evals": 2.5}, "--evals must be a whole number, zero or more, not 2.5."),
    ({"seed": "1"}, "--seed must be a whole number from 0 to 9,223,372,036,854,775,807, not '1'."),
    # Past torch's range: "Overflow when unpacking long long", a traceback from deep in the run.
    ({"seed": 1e20}, "--seed must be a whole number from 0 to 9,223,372,036,854,775,807, not 100000000000000000000."),
    ({"permute_seed": 2 ** 64}, "--permute-seed must be a whole number from 0 to 9,223,372,036,854,775,807"),
    ({"digits_aug": {"rotate": "x"}}, "digits_aug must be an object of augment_digits arguments, each a number"),
])
def test_config_file_values_of_the_wrong_type_are_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                fields: dict, message: str) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps(fields))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_config_file_whole_numbers_written_as_floats_are_taken_as_ints(tmp_path: Path) -> None:
    """JSON may write 16 as 16.0: torch takes no float as a thread count, accumulation count or seed."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"seed": 1.0, "accum": 2.0, "threads": 1.0, "batch_size": 16.0, "steps": 2.0}))
    args = build_parser(["train"]).parse_args(["train", "--config", str(config)])
    r = recipe_from_args(args)
    assert (r.seed, r.accum, r.threads, r.batch_size, r.steps) == (1, 2, 1, 16, 2)
    assert all(type(v) is int for v in (r.seed, r.accum, r.threads, r.batch_size, r.steps))


def test_an_augmentation_flag_replaces_the_config_files_other(tmp_path: Path) -> None:
    """A run's config.json with RandAugment, given as --config, plus --autoaugment trains with AutoAugment alone
    (flags override the file), and the other way round; both in one file are refused."""
    config = tmp_path / "c.json"
    parse = build_parser(["train"]).parse_args
    config.write_text(json.dumps(get_recipe("cifar10-nano").to_dict()))
    r = recipe_from_args(parse(["train", "--recipe", "cifar10-nano", "--config", str(config), "--autoaugment", "svhn"]))
    assert (r.autoaugment, r.randaugment) == ("svhn", None)
    config.write_text(json.dumps(get_recipe("cifar10-nano", autoaugment="cifar10").to_dict()))
    r = recipe_from_args(parse(["train", "--recipe", "cifar10-nano", "--config", str(config), "--randaugment", "4"]))
    assert (r.autoaugment, r.randaugment) == (None, 4)
    config.write_text(json.dumps({"autoaugment": "cifar10", "randaugment": 4}))
    with pytest.raises(ValueError, match="alternatives"):
        recipe_from_args(parse(["train", "--config", str(config)]))


def test_epochs_and_steps_replace_each_other_level_by_level(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Flags over the config file over the preset, for the run's length too: `mixer finetune --epochs 1` ran the
    finetune preset's 10,000 steps (its steps won over any epochs). Within one config file steps win (a run's
    config.json records both); both flags are refused."""
    from mlpmixer.commands.finetune import register as register_finetune

    p = argparse.ArgumentParser()
    register_finetune(p)
    r = get_recipe("finetune", **recipe_overrides(p.parse_args(["--from", "RUN", "--data", "d", "--epochs", "1"])))
    assert (r.steps, r.epochs) == (None, 1)
    parse = build_parser(["train"]).parse_args
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"epochs": 3}))
    assert (recipe_from_args(parse(["train", "--recipe", "finetune", "--config", str(config)])).steps) is None
    config.write_text(json.dumps(get_recipe("finetune").to_dict()))  # as a run's config.json: steps 10000, epochs 1
    assert recipe_from_args(parse(["train", "--config", str(config)])).steps == 10_000
    r = recipe_from_args(parse(["train", "--config", str(config), "--epochs", "2"]))
    assert (r.steps, r.epochs) == (None, 2)
    config.write_text(json.dumps({"epochs": 3}))
    assert recipe_from_args(parse(["train", "--config", str(config), "--steps", "7"])).steps == 7
    assert recipe_from_args(parse(["train"])) == get_recipe("mnist5k")  # the default job is untouched
    assert main(["train", "--epochs", "2", "--steps", "5", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ("mixer train: error: --epochs and --steps both set the run's length; give one "
                                       "of them.\n")


def test_a_config_files_model_args_belong_to_its_model(tmp_path: Path) -> None:
    """A --model other than the config file's is built as its variant defines it (the file's custom widths, or a
    digits run's exact GELU, went to --model digits/4 or S/16), as one other than the preset's already was."""
    parse = build_parser(["train"]).parse_args
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": "nano/4", "model_args": {"hidden_dim": 24, "gelu": "exact"}}))
    assert recipe_from_args(parse(["train", "--config", str(config), "--model", "digits/4"])).model_args == {}
    assert recipe_from_args(parse(["train", "--config", str(config), "--model", "Mixer-nano/4"])).model_args == \
        {"hidden_dim": 24, "gelu": "exact"}  # the same model: its own model_args
    config.write_text(json.dumps({"recipe": get_recipe("mnist5k").to_dict()}))  # a default run's config.json
    r = recipe_from_args(parse(["train", "--config", str(config), "--model", "S/16"]))
    assert (r.model, r.model_args) == ("S/16", {})
    config.write_text(json.dumps({"model_args": {"hidden_dim": 24}}))  # for the preset's model, digits/7
    assert recipe_from_args(parse(["train", "--config", str(config), "--model", "S/16"])).model_args == {}
    assert recipe_from_args(parse(["train", "--config", str(config)])).model_args == {"hidden_dim": 24}


def test_weight_decay_help_says_what_sgd_does() -> None:
    """--weight-decay is decoupled for adam/adamw, but torch's SGD adds it to the gradient, through the momentum:
    the help said "decoupled" for all three."""
    from mlpmixer.train import make_optimizer

    assert "an L2 term in the gradient for sgd" in RECIPE_FLAGS["--weight-decay"][2]
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(1.0)
    opt = make_optimizer(model, get_recipe("finetune", weight_decay=0.1, lr=0.5))
    for _ in range(2):
        model.weight.grad = torch.zeros_like(model.weight)
        opt.step()
    # L2 through momentum 0.9: 1 - 0.5·0.1 = 0.95; buffer 0.9·0.1 + 0.1·0.95 = 0.185: 0.95 - 0.5·0.185 (decoupled: 0.9025)
    assert model.weight.item() == pytest.approx(0.8575)


def test_every_checked_setting_has_a_flag() -> None:
    """The range errors name flags: each field they check must have one, and the pairs take two values."""
    fields = {field for field, _, _ in RECIPE_FLAGS.values()}
    assert {"min_lr", "betas", "momentum", "dropout", "crop_area", "evals", "ema", "mix_prob", "optimizer",
            "schedule", "loss", "eval_mode", "augment_on"} <= fields
    p = argparse.ArgumentParser()
    add_training_flags(p, "mnist5k")
    r = recipe_from_args(p.parse_args(["--crop-area", "0.1", "0.9", "--betas", "0.8", "0.95", "--evals", "3"]))
    assert (r.crop_area, r.betas, r.evals) == ((0.1, 0.9), (0.8, 0.95), 3)
    assert get_recipe("mnist5k").evals == 5


def test_finetune_puts_a_new_head(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = spy_on_curve_labels(monkeypatch)
    out = tmp_path / "ft"
    assert main(["finetune", "--from", str(run_dir), "--data", "mnist5k", "--holdout", "100", "--steps", "2",
                 "--batch-size", "16", "--out", str(out), "--quiet"]) == 0
    model = load_checkpoint(out)
    assert model.num_classes == 10 and model.config.in_chans == 1
    recipe = json.loads((out / "config.json").read_text())["recipe"]
    assert recipe["optimizer"] == "sgd" and recipe["data"] == "mnist5k"
    # The model fine-tuned (the default job's), not the recipe's default digits/4.
    assert (recipe["model"], recipe["model_args"], recipe["img_size"]) == ("digits/7", {"gelu": "exact"}, 28)
    assert drawn == [("training (as optimised)", "validation")]  # no augmentation or smoothing: none claimed


def test_predict_with_published_weights_calls_the_registry(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import mlpmixer.pretrained as pretrained

    asked = []

    def fake_load(name: str, tag: str, **overrides):
        asked.append((name, tag))
        model = create_model("digits/4", num_classes=1000, img_size=28, in_chans=3, patch_size=7)
        torch.nn.init.normal_(model.head.weight)
        return model

    monkeypatch.setattr(pretrained, "load_pretrained", fake_load)
    image = _png(tmp_path / "x.png", np.full((28, 28, 3), 200, dtype=np.uint8))
    assert main(["predict", "--model", "B/16", "--pretrained", "imagenet1k", str(image), "--json"]) == 0
    assert asked == [("B/16", "imagenet1k")]
    names = set(pretrained.imagenet_class_names())
    assert all(t["class"] in names for t in json.loads(capsys.readouterr().out)["top"])
    assert main(["predict", "--pretrained", "imagenet1k", str(image)]) == 2
    assert "--model NAME" in capsys.readouterr().err
    for flags in (["--permute", "pixels"], ["--permute-seed", "3"]):  # were ignored without a word
        assert main(["predict", "--model", "B/16", "--pretrained", "imagenet1k", *flags, str(image)]) == 2
        assert "leave them out with --pretrained." in capsys.readouterr().err
    assert asked == [("B/16", "imagenet1k")]  # refused before the weights are fetched


def test_train_on_an_image_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("ants", "bees"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(10):
            _png(tmp_path / "data" / name / f"{i}.png", rng.integers(0, 256, (36, 30, 3), dtype=np.uint8))
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "data"), "--holdout", "0.2", "--steps", "3", "--batch-size", "4",
                 "--img-size", "28", "--workers", "0", "--out", str(out), "--quiet"]) == 0
    model = load_checkpoint(out)
    assert model.class_names == ["ants", "bees"] and model.config.img_size == (28, 28) and model.config.in_chans == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_top1" in r for r in rows)


def test_too_many_undecodable_images_stop_the_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(6):
            _png(tmp_path / "data" / name / f"{i}.png", rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))
    (tmp_path / "data" / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main(["train", "--data", str(tmp_path / "data"), "--holdout", "0", "--epochs", "2", "--batch-size", "4",
                 "--img-size", "28", "--workers", "0", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "could not be decoded" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_errors_of_a_two_process_run_are_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--processes", "2", "--steps", "1", "--batch-size", "10000", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "larger than the 4750 training images" in err and "Traceback" not in err
    assert main(["train", "--processes", "2", "--steps", "1", "--batch-size", "33", "--out", str(tmp_path / "r")]) == 2
    assert "choose a multiple of 2" in capsys.readouterr().err


@pytest.mark.parametrize("error", [ValueError("The second process's data is gone; put it back."), KeyError("bug")])
def test_an_error_of_a_forked_process_alone_is_told(tmp_path: Path, capfd: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """Rank 0 stopped with "see its error above" while the forked process had printed nothing."""
    import mlpmixer.train

    real_reseed = mlpmixer.train.reseed

    def reseed(seed: int) -> None:  # each step's; fails in the second process only
        if os.environ.get("RANK") == "1":
            raise error
        real_reseed(seed)

    monkeypatch.setattr(mlpmixer.train, "reseed", reseed)
    code = main(["train", "--processes", "2", "--steps", "3", "--batch-size", "32", "--out", str(tmp_path / "r"),
                 "--quiet"]) if isinstance(error, ValueError) else None
    if code is not None:  # a user error: the one sentence, said by rank 0
        assert code == 2
        err = capfd.readouterr().err
        assert "mixer train: error: The second process's data is gone; put it back.\n" in err
        assert "Traceback" not in err and err.count("error") == 1
    else:  # a bug: its traceback, printed where it happened, then rank 0's one-sentence pointer to it
        assert main(["train", "--processes", "2", "--steps", "3", "--batch-size", "32", "--out", str(tmp_path / "r"),
                     "--quiet"]) == 2
        err = capfd.readouterr().err
        assert "Training process 1:\nTraceback" in err and "KeyError: 'bug'" in err
        assert err.endswith("KeyError: 'bug'\nmixer train: error: Another training process stopped; see its error "
                            "above.\n") and err.count("Traceback") == 1, err
    # The watch on the other process is over (Python names a thread after its target: "Thread-3 (_watch)"): left
    # running, it could free the model while pytest exited, which aborted it ("terminate called without an
    # active exception").
    assert not [t.name for t in threading.enumerate() if "watch" in t.name]


@pytest.mark.parametrize("native", [True, False])
def test_bf16_training_on_a_cpu_without_bf16_says_it_is_slow(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    assert main(["train", "--bf16", "--steps", "1", "--batch-size", "8", "--out", str(tmp_path / "run")]) == 0
    assert ("training without --bf16 will be faster here" in capsys.readouterr().out) != native


def test_a_variant_trains_at_its_own_size_on_a_folder(tmp_path: Path) -> None:
    """Without --img-size a folder is read at the variant's size: nano/4 is the 32×32 CIFAR Mixer, not a 224 one."""
    from test_sources import make_folder

    make_folder(tmp_path / "data", {"a": 8, "b": 8})
    assert main(["train", "--data", str(tmp_path / "data"), "--model", "nano/4", "--holdout", "0", "--steps", "1",
                 "--batch-size", "4", "--workers", "0", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert load_checkpoint(tmp_path / "run").config.img_size == (32, 32)


def test_an_interrupted_run_says_where_to_resume_from(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C said "mixer: interrupted." alone, whether a state had been saved or not; and with stderr not a
    terminal (a log file) the progress bar wrote a line of its own per refresh."""
    import mlpmixer.train

    real_save = mlpmixer.train.save_state

    def save_then_stop(folder, model, opt, ema, step, *args, **kwargs):
        real_save(folder, model, opt, ema, step, *args, **kwargs)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(mlpmixer.train, "save_state", save_then_stop)
    run = tmp_path / "run"
    flags = ["train", "--processes", "1", "--steps", "8", "--batch-size", "16", "--evals", "0", "--out", str(run)]
    assert main([*flags, "--save-every", "2"]) == 130
    err = capsys.readouterr().err
    assert err == (f"mixer: interrupted. {run}'s last saved training state is step 4: the same command with --out "
                   f"{run} --resume goes on from there.\n")  # and no progress bar: stderr is no terminal here
    assert main([*flags, "--save-every", "2", "--resume"]) == 0  # as it says
    monkeypatch.setattr(mlpmixer.train, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    other = tmp_path / "unsaved"
    assert main(["train", "--processes", "1", "--steps", "2", "--batch-size", "16", "--out", str(other)]) == 130
    assert capsys.readouterr().err == (f"mixer: interrupted. {other} holds no saved training state to resume from "
                                       "(--save-every N saves one every N steps; the default is none).\n")


def test_a_swallowed_or_unwound_interrupt_still_stops_the_run_with_its_hint(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM's exception landed in a DataLoader iterator's __del__, which swallowed it, and the run went on training;
    an OSError raised in unwinding from Ctrl-C (a worker's death) lost the resume hint."""
    import signal

    import mlpmixer.cli
    import mlpmixer.train

    real_save = mlpmixer.train.save_state

    def swallowed_at(step_of_signal):
        def save(folder, model, opt, ema, step, *args, **kwargs):
            real_save(folder, model, opt, ema, step, *args, **kwargs)
            if step == step_of_signal:
                try:
                    mlpmixer.cli._stop(signal.SIGTERM, None)  # as the handler runs it
                except KeyboardInterrupt:
                    pass  # swallowed where it landed
        return save

    run = tmp_path / "run"
    flags = ["train", "--processes", "1", "--steps", "8", "--batch-size", "16", "--evals", "0", "--save-every", "2",
             "--out", str(run)]
    monkeypatch.setattr(mlpmixer.train, "save_state", swallowed_at(4))
    assert main(flags) == 143
    assert capsys.readouterr().err == (f"mixer: terminated. {run}'s last saved training state is step 4: the same "
                                       f"command with --out {run} --resume goes on from there.\n")

    def unwound(folder, model, opt, ema, step, *args, **kwargs):
        real_save(folder, model, opt, ema, step, *args, **kwargs)
        if step == 6:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise ChildProcessError("A DataLoader worker died")

    monkeypatch.setattr(mlpmixer.train, "save_state", unwound)
    assert main([*flags, "--resume"]) == 130
    assert capsys.readouterr().err.startswith(f"mixer: interrupted. {run}'s last saved training state is step 6: ")


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_whole_process_group_with_dataloader_workers(tmp_path: Path, signal_name: str) -> None:
    """What a scheduler (SIGTERM) or Ctrl-C (SIGINT) does: every process of the group, DataLoader workers too, gets
    it. Runs hung, printed tracebacks, or blamed the out-of-memory killer for the workers it stopped."""
    import signal
    import time

    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(12):
            _png(tmp_path / "data" / name / f"{i}.png", np.full((28, 28, 3), 20 * i, dtype=np.uint8))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mlpmixer", "train", "--data", str(tmp_path / "data"), "--holdout",
                             "4", "--processes", "1", "--workers", "2", "--steps", "100000", "--batch-size", "4",
                             "--save-every", "10", "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not list((run / "checkpoints").glob("step-*.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(0.3)  # into the next epochs, whose workers start and stop
    os.killpg(proc.pid, getattr(signal, signal_name))
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the run went on after {signal_name}: {proc.communicate()[1]}")
    word, status = ("terminated", 143) if signal_name == "SIGTERM" else ("interrupted", 130)
    assert proc.returncode == status and "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"mixer: {word}. {run}'s last saved training state is step "), err


def test_an_error_raised_in_unwinding_from_ctrl_c_is_said_as_the_interrupt(capsys: pytest.CaptureFixture,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A multiprocessing lock that Ctrl-C left half-released raised AssertionError on its way out: a traceback."""
    import mlpmixer.commands.info

    def interrupted_in_a_lock(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise AssertionError("attempt to release recursive lock not owned by thread")

    monkeypatch.setattr(mlpmixer.commands.info, "run", interrupted_in_a_lock)
    assert main(["info"]) == 130
    assert capsys.readouterr().err == "mixer: interrupted.\n"


def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path: Path) -> None:
    """SIGTERM, what schedulers send, ended the process without a word (Python's default)."""
    import signal
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mlpmixer", "train", "--processes", "1", "--steps", "100000",
                             "--batch-size", "16", "--save-every", "5", "--evals", "0", "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((run / "checkpoints").glob("step-*.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"mixer: terminated. {run}'s last saved training state is step ") and "--resume" in last
