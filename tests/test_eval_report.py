"""`mixer eval --report`, `--eval-mode`, and the permutation experiment (`mixer train --permute`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlpmixer import create_model, load_checkpoint, save_checkpoint
from mlpmixer.cli import main
from mlpmixer.data import holdout_split, load_mnist5k, to_model_input
from mlpmixer.evaluate import evaluate, open_eval_data
from mlpmixer.permute import FixedPermutation
from mlpmixer.recipes import get_recipe


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random digits model whose head is a nearest-class-mean classifier of its features: better than
    chance, with accuracies that differ from class to class."""
    torch.manual_seed(0)
    model = create_model("digits/4", num_classes=10, img_size=28, in_chans=1, patch_size=7, hidden_dim=32,
                         tokens_mlp_dim=16, channels_mlp_dim=64).eval()
    data = load_mnist5k().subset(torch.arange(0, 5000, 10))
    with torch.no_grad():
        features = model.forward_head(model.forward_features(to_model_input(data.images, 28, 1)), pre_logits=True)
        means = torch.stack([features[data.labels == c].mean(0) for c in range(10)])
        model.head.weight.copy_(means)
        model.head.bias.copy_(-0.5 * means.square().sum(1))  # logits: -|x - mean|² / 2 up to a shared term
    model.class_names = [str(i) for i in range(10)]
    return save_checkpoint(model, tmp_path_factory.mktemp("report") / "digits.safetensors")


def test_evaluate_returns_predictions_only_on_request(digits_model: Path) -> None:
    model = load_checkpoint(digits_model)
    data = load_mnist5k().subset(torch.arange(0, 5000, 50))
    plain = evaluate(model, data, batch_size=32)
    assert "preds" not in plain and "labels" not in plain
    m = evaluate(model, data, batch_size=32, predictions=True)
    with torch.no_grad():
        expected = model.eval()(to_model_input(data.images, 28, 1)).argmax(1)
    assert torch.equal(m["preds"], expected) and torch.equal(m["labels"], data.labels)
    assert m["top1"] == plain["top1"] == pytest.approx((expected == data.labels).float().mean().item())
    # A --data spec works in place of opened data.
    assert evaluate(model, "mnist5k")["top1"] == evaluate(model, load_mnist5k())["top1"]


def test_eval_report_files_match_a_direct_computation(digits_model: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    report = tmp_path / "report"
    assert main(["eval", str(digits_model), "--data", "mnist5k", "--report", str(report), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)

    model = load_checkpoint(digits_model).eval()
    data = load_mnist5k()
    with torch.no_grad():
        preds = model(to_model_input(data.images, 28, 1)).argmax(1)
    expected = [(preds[data.labels == c] == c).float().mean().item() for c in range(10)]
    assert len(set(np.round(expected, 3))) > 3  # a model whose classes really differ

    saved = json.loads((report / "per_class.json").read_text())
    assert [c["name"] for c in saved["classes"]] == [str(i) for i in range(10)]
    assert [c["n"] for c in saved["classes"]] == [500] * 10
    assert [c["accuracy"] for c in saved["classes"]] == pytest.approx(expected)
    assert [printed["per_class"][str(c)] for c in range(10)] == pytest.approx(expected)
    assert saved["top1"] == printed["top1"] == pytest.approx((preds == data.labels).float().mean().item())

    png = report / "confusion.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
        assert min(image.size) > 200


def test_eval_without_report_has_no_per_class(digits_model: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(digits_model), "--data", "mnist5k", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "per_class" not in result
    # --eval-data, as train, fewshot and linear-probe name the evaluation images, is the same option.
    assert main(["eval", str(digits_model), "--eval-data", "mnist5k", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == result


def test_eval_report_keeps_every_class_of_a_repeated_name(digits_model: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Keyed by name, two classes named "crane" (as ImageNet names two) were one in per_class and in the
    weakest-classes line. Data with such names (opened here directly: sources refuse a dataset.json that
    repeats a name) and a model of the same names."""
    import mlpmixer.evaluate

    names = ["crane", "crane", *map(str, range(2, 10))]
    model = load_checkpoint(digits_model)
    model.class_names = names
    saved = save_checkpoint(model, tmp_path / "cranes.safetensors")
    data = load_mnist5k()
    data.class_names = names
    monkeypatch.setattr(mlpmixer.evaluate, "open_eval_data", lambda *_: data)
    argv = ["eval", str(saved), "--data", "cranes", "--report", str(tmp_path / "report")]
    assert main([*argv, "--json"]) == 0
    per_class = json.loads(capsys.readouterr().out)["per_class"]
    assert list(per_class)[:3] == ["crane (class 0)", "crane (class 1)", "2"] and len(per_class) == 10
    report = json.loads((tmp_path / "report" / "per_class.json").read_text())
    assert [c["name"] for c in report["classes"]] == names  # the names as they are, in a list
    assert [c["accuracy"] for c in report["classes"]] == list(per_class.values())
    # The weakest three, by accuracy: both cranes can be among them, each named.
    worst = sorted((a, key) for key, a in per_class.items())[:3]
    assert main(argv) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Lowest"))
    assert line.startswith("Lowest per-class accuracy: " + ", ".join(f"{key} {a:.2%}" for a, key in worst) + ".")


def test_eval_help_names_every_key_of_its_json(digits_model: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(digits_model), "--data", "mnist5k", "--permute", "pixels", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    helped = " ".join(capsys.readouterr().out.split())  # argparse wraps the help over several lines
    assert "permute_seed" in printed and [key for key in printed if key not in helped] == []


def test_predict_notes_the_permutation_it_applies(digits_model: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    """As `mixer eval` says "permuted (pixels, seed 0)": the probabilities are those of the permuted image."""
    digit = tmp_path / "digit.png"
    Image.fromarray(load_mnist5k().images[0, 0].numpy()).save(digit)
    assert main(["predict", str(digits_model), str(digit), "--permute", "pixels", "--permute-seed", "2", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["notes"] == ["permuted (pixels, seed 2) as the model was trained"]
    assert f"{digit}: note: permuted (pixels, seed 2) as the model was trained." in captured.err
    assert main(["predict", str(digits_model), str(digit), "--json"]) == 0  # no permutation, no note
    assert json.loads(capsys.readouterr().out)["notes"] == []


def test_predict_says_whether_a_pattern_matched_nothing_or_was_quoted(digits_model: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """bash passes an unquoted pattern that matches nothing on as it is: that is not a quoted pattern."""
    Image.fromarray(load_mnist5k().images[0, 0].numpy()).save(tmp_path / "digit.png")
    assert main(["predict", str(digits_model), str(tmp_path / "*.xyz")]) == 2
    assert capsys.readouterr().err == f"mixer predict: error: No file matches {tmp_path / '*.xyz'}; check the pattern.\n"
    assert main(["predict", str(digits_model), str(tmp_path / "*.png")]) == 2  # quoted: it does match
    assert capsys.readouterr().err == (f"mixer predict: error: {tmp_path / '*.png'} is a pattern, which the shell "
                                       "expands only unquoted (it matches 1 file); leave the pattern unquoted for the "
                                       "shell to expand.\n")


def test_predict_refuses_greyscale_of_no_stated_range_and_notes_16_bit(digits_model: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """A 32-bit integer TIFF was read as 16-bit ("kept the top 8 bits of 16-bit greyscale"), all white here."""
    Image.fromarray(np.full((28, 28), 1_260_000, dtype=np.int32)).save(tmp_path / "wide.tif")
    assert main(["predict", str(digits_model), str(tmp_path / "wide.tif")]) == 2
    assert capsys.readouterr().err == (
        f"mixer predict: error: {tmp_path / 'wide.tif'} is 32-bit integer greyscale (values 1,260,000 to 1,260,000), "
        "whose range of values the file does not state; convert it to 8- or 16-bit greyscale.\n")
    Image.fromarray(np.full((28, 28), 40000, dtype=np.uint16)).save(tmp_path / "deep.pgm")  # PIL: mode I
    assert main(["predict", str(digits_model), str(tmp_path / "deep.pgm"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == ["kept the top 8 bits of 16-bit greyscale"]


def test_eval_mode_chooses_the_preprocessing_of_image_folders(digits_model: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)
    for c in range(10):  # a 10-class folder of wide 28×56 images, whose crop and squeeze differ
        (tmp_path / "folder" / str(c)).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (28, 56), dtype=np.uint8)).save(tmp_path / "folder" / str(c) / "a.png")
    folder = str(tmp_path / "folder")
    model = load_checkpoint(digits_model)
    squeezed = open_eval_data(folder, model, "resize").dataset[0][0]
    cropped = open_eval_data(folder, model, "resmall-crop").dataset[0][0]
    assert squeezed.shape == cropped.shape == (1, 28, 28) and not torch.allclose(squeezed, cropped)
    losses = []
    for mode in ("resize", "resmall-crop"):
        assert main(["eval", str(digits_model), "--data", folder, "--eval-mode", mode, "--workers", "0",
                     "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["n"] == 10
        losses.append(out["loss"])
    assert losses[0] != pytest.approx(losses[1])


def test_eval_on_other_classes_names_the_first_that_differs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from test_sources import make_folder

    model = create_model("digits/4", num_classes=7, img_size=8, in_chans=3, patch_size=4)
    model.class_names = list("abcdefg")
    save_checkpoint(model, tmp_path / "m.safetensors")
    make_folder(tmp_path / "data", dict.fromkeys("abcdefh", 1))  # the same first five: the lists read alike
    assert main(["eval", str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "data"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "differ from those of the model (class 6 is 'h' instead of 'g')" in err and "Traceback" not in err


def test_eval_report_at_a_file_is_refused_before_evaluating(digits_model: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    before = digits_model.read_bytes()
    assert main(["eval", str(digits_model), "--data", "mnist5k", "--report", str(digits_model)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"mixer eval: error: --report {digits_model} is a file; give the path of a folder."
    assert "evaluating" not in captured.err and captured.out == ""  # said before the work, not after
    assert digits_model.read_bytes() == before


def test_train_with_permuted_patches_validates_and_evaluates_permuted(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "permuted"
    assert main(["train", "--permute", "patches", "--permute-seed", "3", "--steps", "6", "--batch-size", "32",
                 "--processes", "1", "--save-every", "3", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()  # the training's own messages
    recipe = json.loads((out / "config.json").read_text())["recipe"]
    assert recipe["permute"] == "patches" and recipe["permute_seed"] == 3

    # The run's last validation was on its hold-out, permuted: recompute it both ways.
    model = load_checkpoint(out)
    r = get_recipe("mnist5k")
    _, val_idx = holdout_split(5000, r.holdout, r.seed)
    val = load_mnist5k().subset(val_idx)
    permute = FixedPermutation("patches", 28, 7, seed=3)
    last = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in m][-1]
    permuted = evaluate(model, val, transform=permute)
    plain = evaluate(model, val)
    assert last["val_loss"] == pytest.approx(permuted["loss"], rel=1e-4)
    assert abs(last["val_loss"] - plain["loss"]) > 1e-3

    # `mixer eval RUN` applies the recorded permutation; --permute none turns it off.
    full = load_mnist5k()
    with pytest.warns(UserWarning, match="the run trained on mnist5k, so this accuracy includes the images"):
        assert main(["eval", str(out), "--data", "mnist5k", "--json"]) == 0
    recorded = json.loads(capsys.readouterr().out)
    assert recorded["permute"] == "patches" and recorded["permute_seed"] == 3
    assert recorded["loss"] == pytest.approx(evaluate(model, full, transform=permute)["loss"], rel=1e-5)
    assert main(["eval", str(out), "--data", "mnist5k", "--permute", "none", "--json"]) == 0
    off = json.loads(capsys.readouterr().out)
    assert "permute" not in off and off["loss"] == pytest.approx(evaluate(model, full)["loss"], rel=1e-5)
    # So does `mixer eval` of a training state in the run's checkpoints/ folder.
    state = sorted((out / "checkpoints").glob("step-*.pt"))[-1]
    with pytest.warns(UserWarning, match="includes the images"):
        assert main(["eval", str(state), "--data", "mnist5k", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["permute"] == "patches"

    # predict, linear-probe and fewshot apply it too: their defaults equal the explicit permutation.
    digit = tmp_path / "digit.png"
    Image.fromarray(full.images[0, 0].numpy()).save(digit)
    assert main(["predict", str(out), str(digit), "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["top"][0]
    with torch.no_grad():
        probs = model.eval()(permute(to_model_input(full.images[:1], 28, 1))).softmax(-1)[0]
    assert top["prob"] == pytest.approx(float(probs.max()), rel=1e-5) and top["class"] == str(int(probs.argmax()))
    for command in ("linear-probe", "fewshot"):
        results = []
        for extra in ([], ["--permute", "patches", "--permute-seed", "3"], ["--permute", "none"]):
            assert main([command, str(out), "--data", "mnist5k", "--json", *extra]) == 0
            results.append(capsys.readouterr().out)
        assert results[0] == results[1] != results[2], command

    # Without its config.json readable, a run cannot say how its images are prepared: one sentence.
    (out / "config.json").write_text("{")
    assert main(["eval", str(out), "--data", "mnist5k"]) != 0
    assert "config.json cannot be read" in capsys.readouterr().err


def test_eval_uses_the_evaluation_mode_a_run_validated_with(digits_model: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "images"
    for i, image in enumerate(load_mnist5k().images[:10, 0].numpy()):
        (folder / str(i % 10)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.pad(image, ((0, 0), (8, 8)))).save(folder / str(i % 10) / f"{i}.png")  # 28×44
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(load_checkpoint(digits_model), run / "model.safetensors")
    (run / "config.json").write_text(json.dumps({"recipe": {"eval_mode": "resmall-crop"}}))
    said = {}
    for extra in ([], ["--eval-mode", "resmall-crop"], ["--eval-mode", "resize"]):
        assert main(["eval", str(run), "--data", str(folder), "--workers", "0", "--json", *extra]) == 0
        out = json.loads(capsys.readouterr().out)
        said[out["eval_mode"]] = said.get(out["eval_mode"], []) + [out["loss"]]
    assert said["resmall-crop"][0] == said["resmall-crop"][1] != said["resize"][0]


def test_eval_on_the_images_a_run_trained_on_is_said(digits_model: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """An IDX folder of t10k- files only, which training reads for want of train- files, and an image folder
    named another way (`data/` for `data`) were evaluated on the images trained on without a word."""
    import os
    import warnings

    from test_fewshot import write_idx_digits

    said = "so this accuracy includes the images it trained on; give held-out data for a fair measure."

    def warned(trained_on: str, data: str) -> list[str]:
        run = tmp_path / "run"
        run.mkdir(exist_ok=True)
        save_checkpoint(load_checkpoint(digits_model), run / "model.safetensors")
        (run / "config.json").write_text(json.dumps({"recipe": {"data": trained_on}}))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["eval", str(run), "--data", data, "--workers", "0", "--json"]) == 0
        capsys.readouterr()
        return [str(w.message) for w in caught if said in str(w.message)]

    digits = write_idx_digits(tmp_path / "digits", per_class=2)
    assert warned(digits, digits) == [f"the run trained on {digits}, {said}"]
    write_idx_digits(tmp_path / "digits", per_class=2, prefix="train")  # trained on train-, evaluated on t10k-
    assert warned(digits, digits) == []
    folder = tmp_path / "images"
    for i, image in enumerate(load_mnist5k().images[:10, 0].numpy()):
        (folder / str(i)).mkdir(parents=True)
        Image.fromarray(image).save(folder / str(i) / "0.png")
    assert warned(str(folder), str(folder) + os.sep) == [f"the run trained on {folder}{os.sep}, {said}"]
    assert warned("mnist5k", str(folder)) == []


def test_eval_says_which_classes_have_no_images_for_every_kind_of_data(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """An image folder's empty class folder was said, but an IDX folder without a digit or shards without a class
    that their dataset.json names left it out of the accuracy without a word; now each is said once."""
    import json as json_module
    import warnings

    from test_fewshot import tiny_checkpoint, write_idx_digits
    from test_sources import make_folder, make_shards

    said = "holds no images: its class has nothing to evaluate"

    def warnings_of(checkpoint: Path, data: str) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["eval", str(checkpoint), "--data", data, "--workers", "0", "--json"]) == 0
        capsys.readouterr()
        return [str(w.message) for w in caught if said in str(w.message)]

    digits = tiny_checkpoint(tmp_path / "digits.safetensors")
    no_sevens = write_idx_digits(tmp_path / "no_sevens", per_class=2, fewer={7: 0})
    assert warnings_of(digits, no_sevens) == [f"The evaluation part of class 7 (--data {no_sevens}) {said}."]
    assert warnings_of(digits, write_idx_digits(tmp_path / "all", per_class=2)) == []

    model = create_model("digits/4", num_classes=4, img_size=8, in_chans=3, patch_size=4)
    model.class_names = [f"class{c}" for c in range(4)]
    small = save_checkpoint(model, tmp_path / "small.safetensors")
    make_shards(tmp_path / "shards", shards=1, per_shard=6, classes=3)  # labels 0-2
    info = json_module.loads((tmp_path / "shards" / "dataset.json").read_text())
    (tmp_path / "shards" / "dataset.json").write_text(json_module.dumps({**info, "classes": model.class_names}))
    shards = str(tmp_path / "shards")
    assert warnings_of(small, shards) == [f"The evaluation part of class 3 (class3) (--data {shards}) {said}."]
    make_folder(tmp_path / "folder", {"class0": 1, "class1": 1, "class2": 1, "class3": 0})
    assert warnings_of(small, str(tmp_path / "folder")) == [f"The class folder {tmp_path / 'folder' / 'class3'} {said}."]
