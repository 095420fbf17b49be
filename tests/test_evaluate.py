"""Top-1 / top-5 evaluation against a direct computation, and `mixer eval`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mlpmixer import create_model, save_checkpoint
from mlpmixer.cli import main
from mlpmixer.data import load_mnist5k, to_model_input
from mlpmixer.evaluate import evaluate

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random (untrained) digits model with a random head, so its predictions vary."""
    torch.manual_seed(0)
    model = create_model("digits/4", num_classes=10, img_size=28, in_chans=1, patch_size=7, hidden_dim=32,
                         tokens_mlp_dim=16, channels_mlp_dim=64)
    torch.nn.init.normal_(model.head.weight, std=1.0)
    model.class_names = [str(i) for i in range(10)]
    path = tmp_path_factory.mktemp("eval") / "digits.safetensors"
    save_checkpoint(model, path)
    return path


def test_evaluate_matches_a_direct_computation(digits_model: Path) -> None:
    from mlpmixer import load_checkpoint

    model = load_checkpoint(digits_model).eval()
    full = load_mnist5k()
    data = full.subset(torch.arange(0, 5000, 16)[:300])  # all classes (the file is sorted by class)
    with torch.no_grad():
        logits = model(to_model_input(data.images, 28, 1))
    top5 = logits.topk(5, 1).indices
    expect1 = (top5[:, 0] == data.labels).float().mean().item()
    expect5 = (top5 == data.labels[:, None]).any(1).float().mean().item()
    m = evaluate(model, data, batch_size=64)  # several batches, the last one partial
    assert m["n"] == 300
    assert m["top1"] == pytest.approx(expect1) and m["top5"] == pytest.approx(expect5)
    assert m["top1"] <= m["top5"] and m["top5"] > expect1  # not a degenerate model
    assert m["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, data.labels).item(), rel=1e-5)


def test_a_headless_model_is_one_sentence() -> None:
    headless = create_model("digits/4", num_classes=0, img_size=28, in_chans=1)
    with pytest.raises(ValueError, match=r"needs a classifier head.*num_classes=0.*reset_classifier\(N\).*fewshot"):
        evaluate(headless, "mnist5k")


def test_eval_json_on_idx_folder_and_embedded_set(digits_model: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(digits_model), "--data", str(MNIST), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 10000 and 0 <= out["top1"] <= out["top5"] <= 1
    assert main(["eval", str(digits_model), "--data", "mnist5k", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 5000
    assert main(["eval", str(digits_model), "--data", "mnist5k"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_eval_bad_input(digits_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(digits_model), "--data", str(tmp_path / "missing")]) != 0
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err and err.count("\n") == 1
    assert main(["eval", str(tmp_path / "none.safetensors"), "--data", "mnist5k"]) != 0
    assert "No checkpoint" in capsys.readouterr().err
    three = create_model("digits/4", num_classes=3, img_size=28, in_chans=1)
    save_checkpoint(three, tmp_path / "three.safetensors")
    assert main(["eval", str(tmp_path / "three.safetensors"), "--data", "mnist5k"]) != 0
    assert "10 classes but the model predicts 3" in capsys.readouterr().err


def test_a_killed_dataloader_worker_is_one_sentence(digits_model: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from test_train import KilledInWorker

    import mlpmixer.evaluate
    from mlpmixer.data import Source

    monkeypatch.setattr(mlpmixer.evaluate, "open_eval_data",
                        lambda *_: Source(KilledInWorker(), [str(i) for i in range(10)], 8))
    assert main(["eval", str(digits_model), "--data", "elsewhere", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"mixer eval: error: A DataLoader worker died \(DataLoader worker \(pid.*; the out-of-memory "
                        r"killer\?\); rerun the command \(fewer --workers take less memory\)\.\n", err), err
    assert err.count("error") == 1  # no traceback


def test_an_undecodable_image_is_left_out_of_the_score(digits_model: Path, tmp_path: Path) -> None:
    """A folder's bad image counts neither as itself nor twice as the next one: n is the good images."""
    import warnings

    from test_sources import make_folder

    from mlpmixer import load_checkpoint
    from mlpmixer.evaluate import open_eval_data

    model = load_checkpoint(digits_model)
    model.class_names = ["a", "b"]
    model.reset_classifier(2)
    torch.nn.init.normal_(model.head.weight)
    make_folder(tmp_path / "good", {"a": 150, "b": 150})
    make_folder(tmp_path / "bad", {"a": 150, "b": 150}, bad=(4, 5))  # below 1%; a batch of 2 is all bad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean = evaluate(model, open_eval_data(str(tmp_path / "good"), model), batch_size=2, workers=0,
                         predictions=True)
        damaged = evaluate(model, open_eval_data(str(tmp_path / "bad"), model), batch_size=2, workers=0,
                           predictions=True)
    assert damaged["n"] == 298 and clean["n"] == 300
    kept = [i for i in range(300) if i not in (4, 5)]  # the same pictures as the clean folder's
    assert torch.equal(damaged["preds"], clean["preds"][kept]) and torch.equal(damaged["labels"], clean["labels"][kept])


def test_top5_is_not_reported_for_5_classes_or_fewer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Every class is among the top 5 then: a top-5 accuracy would be a meaningless 100%."""
    import numpy as np
    from PIL import Image

    data = load_mnist5k().subset(torch.arange(0, 5000, 50))
    for classes, want_top5 in ((3, False), (5, False), (6, True)):
        torch.manual_seed(0)
        model = create_model("digits/4", num_classes=classes, img_size=28, in_chans=1, patch_size=7, hidden_dim=32,
                             tokens_mlp_dim=16, channels_mlp_dim=64)
        kept = data.subset(torch.nonzero(data.labels < classes).flatten())
        kept.class_names = kept.class_names[:classes]
        m = evaluate(model, kept)
        assert (m["top5"] is not None) == want_top5 and 0 <= m["top1"] <= 1, classes
        if classes == 3:
            save_checkpoint(model, tmp_path / "three.safetensors")
    rng = np.random.default_rng(0)
    for name in "abc":  # a 3-class folder, through `mixer eval`: text, --json and --report
        (tmp_path / "folder" / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "folder" / name / "0.png")
    argv = ["eval", str(tmp_path / "three.safetensors"), "--data", str(tmp_path / "folder"), "--workers", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "no top-5 with 3 classes" in out and "top-5 100" not in out
    assert main([*argv, "--json", "--report", str(tmp_path / "report")]) == 0
    assert json.loads(capsys.readouterr().out)["top5"] is None
    assert json.loads((tmp_path / "report" / "per_class.json").read_text())["top5"] is None


def test_evaluate_refuses_data_of_other_classes_in_one_sentence(tmp_path: Path) -> None:
    """The Python API checks the classes as `mixer eval` does: more labels than the head made torch's bare
    IndexError, fewer gave numbers without a word."""
    from test_sources import make_folder

    make_folder(tmp_path / "three", {"a": 2, "b": 2, "c": 2})
    for classes in (2, 10):
        model = create_model("digits/4", num_classes=classes, img_size=28, in_chans=1, patch_size=7, hidden_dim=32,
                             tokens_mlp_dim=16, channels_mlp_dim=64)
        with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'three'))} has 3 classes but the model "
                                             rf"predicts {classes}; evaluate on data with the model's classes\.$"):
            evaluate(model, tmp_path / "three", workers=0)
    model.class_names = [str(i) for i in range(10)]  # named classes: the names must agree too
    data = load_mnist5k()
    data.class_names = list("abcdefghij")
    with pytest.raises(ValueError, match=r"classes of the data differ from those of the model \(class 0 is 'a' "
                                         r"instead of '0'\)"):
        evaluate(model, data)


def test_eval_json_names_the_mode_that_ran_on_in_memory_digits(digits_model: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    """In-memory digits are always resized: asked (or recorded by the run) for resmall-crop, the JSON and the
    report say resize, and a warning says why."""
    import shutil

    argv = ["--data", "mnist5k", "--json", "--report", str(tmp_path / "report")]
    with pytest.warns(UserWarning, match=r"^Eval mode resmall-crop does not apply to mnist5k: digits held in memory "
                                         r"are always resized to the model's size, so the result is for resize\.$"):
        assert main(["eval", str(digits_model), "--eval-mode", "resmall-crop", *argv]) == 0
    assert json.loads(capsys.readouterr().out)["eval_mode"] == "resize"
    assert json.loads((tmp_path / "report" / "per_class.json").read_text())["eval_mode"] == "resize"
    run = tmp_path / "run"  # a run that validated with resmall-crop
    run.mkdir()
    shutil.copy(digits_model, run / "model.safetensors")
    (run / "config.json").write_text(json.dumps({"recipe": {"eval_mode": "resmall-crop"}}))
    with pytest.warns(UserWarning, match="Eval mode resmall-crop does not apply to mnist5k"):
        assert main(["eval", str(run), *argv]) == 0
    assert json.loads(capsys.readouterr().out)["eval_mode"] == "resize"


def _last_validation(run: Path) -> dict:
    return [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_top1" in m][-1]


@pytest.mark.parametrize("data", ["mnist5k", "shards"])
def test_eval_of_a_run_without_data_scores_its_own_validation(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              data: str) -> None:
    """`mixer eval RUN` needed --data, and no --data scored the run's hold-out: only Python could check the number
    its metrics logged. Without --data it now scores those very images (a count of shards' images included)."""
    from test_sources import make_shards

    if data == "shards":
        make_shards(tmp_path / "shards", shards=2, per_shard=30, suffix=".tar.gz")
        data = str(tmp_path / "shards")
    run = tmp_path / "run"
    assert main(["train", "--data", data, "--holdout", "12", "--steps", "6", "--batch-size", "16", "--workers", "0",
                 "--quiet", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--workers", "0", "--json"]) == 0
    result, logged = json.loads(capsys.readouterr().out), _last_validation(run)
    assert (result["top1"], result["n"]) == (logged["val_top1"], logged["val_n"])
    assert result["loss"] == pytest.approx(logged["val_loss"], rel=1e-6)
    assert result["part"].startswith("the images the run held out of") and result["data"] == data


def test_eval_without_data_needs_a_run_that_validated(digits_model: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(digits_model)]) == 2
    assert "is not a mixer train run (no run's config.json beside it) with validation images of its own; give --data." \
        in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["train", "--holdout", "0", "--steps", "2", "--batch-size", "16", "--quiet", "--out", str(run)]) == 0
    assert main(["eval", str(run)]) == 2
    assert "held out none of mnist5k and had no --eval-data: it validated on nothing; give --data." in capsys.readouterr().err


def test_eval_of_a_run_trained_on_a_relative_path_elsewhere_says_so(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from another folder, `mixer eval RUN` blamed "c12", a path the user never typed there."""
    from test_sources import make_shards

    make_shards(tmp_path / "shards", shards=1, per_shard=30)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "shards", "--holdout", "6", "--steps", "2", "--batch-size", "8", "--workers", "0",
                 "--quiet", "--out", "run"]) == 0
    monkeypatch.chdir(tmp_path / "run")
    capsys.readouterr()
    assert main(["eval", "."]) == 2
    assert capsys.readouterr().err == ("mixer eval: error: The run's data shards is not here: its config.json records "
                                       "the path as it was given, relative to the folder the run was started in; run "
                                       "from there or give --data.\n")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "run", "--workers", "0"]) == 0  # from there, as it says
    # A run validated on an --eval-data given in full is scored from anywhere, its relative --data unread.
    assert main(["train", "--data", "shards", "--eval-data", str(tmp_path / "shards"), "--steps", "2", "--batch-size",
                 "8", "--workers", "0", "--quiet", "--out", "run2"]) == 0
    monkeypatch.chdir(tmp_path / "run2")
    assert main(["eval", ".", "--workers", "0"]) == 0
