"""Few-shot linear evaluation (SPEC §4): the closed-form solver, support draws, features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from mlpmixer import create_model
from mlpmixer.fewshot import (
    design_matrix,
    extract_features,
    fewshot_evaluate,
    fit_least_squares,
    ShotResult,
    sample_support,
    split_pool,
)


def reference_weights(features: np.ndarray, labels: np.ndarray, classes: int, l2: float) -> np.ndarray:
    """Ridge regression as one plain least-squares problem: [A; √l2·I] W ≈ [Y; 0]."""
    mean, std = features.mean(0), features.std(0) + 1e-5
    a = np.hstack([(features - mean) / std, np.full((len(features), 1), 100.0)])
    y = 2.0 * np.eye(classes)[labels] - 1.0
    d = a.shape[1]
    big_a = np.vstack([a, np.sqrt(l2) * np.eye(d)])
    big_y = np.vstack([y, np.zeros((d, classes))])
    return np.linalg.lstsq(big_a, big_y, rcond=None)[0]


@pytest.mark.parametrize("n,d,l2", [(200, 12, 1024.0), (7, 40, 1024.0), (30, 20, 0.5)])
def test_solver_matches_direct_least_squares(n, d, l2):
    rng = np.random.default_rng(n)
    features = rng.normal(size=(n, d)) * rng.uniform(0.1, 5, size=d) + rng.normal(size=d)
    labels = rng.integers(0, 4, size=n)
    probe = fit_least_squares(torch.from_numpy(features).float(), torch.from_numpy(labels), 4, l2)
    want = reference_weights(features.astype(np.float32).astype(np.float64), labels, 4, l2)
    np.testing.assert_allclose(probe.weight.numpy(), want, rtol=1e-6, atol=1e-9)
    # Standardised features with the bias column, as the reference builds them.
    a = design_matrix(torch.from_numpy(features), probe.mean, probe.std)
    assert a.shape == (n, d + 1) and torch.all(a[:, -1] == 100)


def test_solver_classifies_separable_data():
    torch.manual_seed(0)
    centres = torch.randn(5, 32) * 4
    labels = torch.arange(5).repeat(40)
    features = centres[labels] + torch.randn(200, 32)
    probe = fit_least_squares(features, labels, 5)
    assert probe.accuracy(features, labels) > 0.95
    for l2 in (0, float("inf"), float("nan")):  # inf: zero weights, a chance-level classifier without a word
        with pytest.raises(ValueError, match="positive finite"):
            fit_least_squares(features, labels, 5, l2=l2)


def test_bias_is_almost_unregularised():
    """big_vision appends a bias feature of 100 so that ℓ2 all but spares the bias; with a bias feature of 1 and
    ℓ2 = 1024, the learned class priors of 100 uninformative examples shrank to a tenth."""
    labels = torch.tensor([0] * 90 + [1] * 10)
    probe = fit_least_squares(torch.zeros(100, 4), labels, 2)
    # Without information the best scores are the mean ±1 targets: 0.9 - 0.1 and 0.1 - 0.9.
    torch.testing.assert_close(probe.scores(torch.zeros(1, 4))[0], torch.tensor([0.8, -0.8], dtype=torch.float64),
                               rtol=2e-3, atol=0)


def test_shot_result_statistics():
    import math

    assert math.isnan(ShotResult(1).mean) and ShotResult(1).std == 0.0  # no draw yet
    done = ShotResult(5, [0.5, 0.7])
    assert done.mean == pytest.approx(0.6) and done.to_dict()["accuracies"] == [0.5, 0.7]


def test_support_draws_and_errors():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    g = torch.Generator().manual_seed(0)
    idx = sample_support(labels, 3, 3, g)
    assert torch.bincount(labels[idx]).tolist() == [3, 3, 3]
    assert len(set(idx.tolist())) == 9
    with pytest.raises(ValueError, match=r"4-shot .* has 3 of class 1 \(cat\)"):
        sample_support(labels, 4, 3, g, class_names=["dog", "cat", "cow"])


def test_split_pool_is_stratified_and_disjoint():
    labels = torch.tensor([0] * 10 + [1] * 20)
    pool, held = split_pool(labels, 0.3, seed=1)
    assert set(pool.tolist()).isdisjoint(held.tolist())
    assert sorted(pool.tolist() + held.tolist()) == list(range(30))
    assert torch.bincount(labels[held]).tolist() == [3, 6]
    assert torch.equal(split_pool(labels, 0.3, seed=1)[0], pool)
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_pool(labels, 1.0)


def test_fewshot_evaluate_statistics():
    torch.manual_seed(0)
    centres = torch.randn(4, 16) * 3
    pool_y = torch.arange(4).repeat(30)
    eval_y = torch.arange(4).repeat(25)
    pool_x = centres[pool_y] + torch.randn(120, 16)
    eval_x = centres[eval_y] + torch.randn(100, 16)
    results = fewshot_evaluate(pool_x, pool_y, eval_x, eval_y, shots=(1, 10), draws=4, seed=3)
    assert sorted(results) == [1, 10]
    for r in results.values():
        assert len(r.accuracies) == 4
        assert r.mean == pytest.approx(np.mean(r.accuracies))
        assert r.std == pytest.approx(np.std(r.accuracies, ddof=1))
    assert results[10].mean > 0.9
    again = fewshot_evaluate(pool_x, pool_y, eval_x, eval_y, shots=(1,), draws=4, seed=3)
    assert again[1].accuracies == results[1].accuracies
    with pytest.raises(ValueError, match="31-shot"):
        fewshot_evaluate(pool_x, pool_y, eval_x, eval_y, shots=(31,))


def test_extract_features_are_frozen_pre_logits():
    torch.manual_seed(0)
    model = create_model("digits/4", img_size=8, hidden_dim=16, num_blocks=1, tokens_mlp_dim=8,
                         channels_mlp_dim=16, num_classes=3)
    model.train()
    images, labels = torch.randn(10, 3, 8, 8), torch.arange(10) % 3
    feats, got_labels = extract_features(model, DataLoader(TensorDataset(images, labels), batch_size=4))
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        want = model.forward_head(model.forward_features(images), pre_logits=True)
    assert feats.shape == (10, 16) and torch.equal(got_labels, labels)
    torch.testing.assert_close(feats, want)
    # Named, in the names' order, whatever order the batches came in (as from DataLoader workers).
    names = [f"shard:{i:02d}" for i in range(10)]
    backwards = [(images[i:i + 4], labels[i:i + 4], names[i:i + 4]) for i in (8, 4, 0)]
    feats, got_labels = extract_features(model, backwards)
    assert torch.equal(got_labels, labels)
    torch.testing.assert_close(feats, want)


def tiny_checkpoint(path):
    from mlpmixer import save_checkpoint

    torch.manual_seed(0)
    # A random-feature Mixer: its frozen features are enough for well-above-chance linear accuracy.
    model = create_model("digits/4", img_size=28, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16,
                         channels_mlp_dim=32, num_classes=10)
    save_checkpoint(model, path)
    return path


def write_idx_digits(folder, per_class, prefix="t10k", fewer=None):
    """A small MNIST IDX folder: the first `per_class` embedded digits of each class (`fewer`: {class: count}
    for classes given fewer), as its `prefix` (t10k or train) files."""
    from mlpmixer.data import load_mnist5k

    data = load_mnist5k()
    counts = {c: per_class for c in range(10)} | (fewer or {})
    index = torch.cat([torch.nonzero(data.labels == c).flatten()[:counts[c]] for c in range(10)])
    images, labels = data.images[index, 0].numpy(), data.labels[index].numpy().astype(np.uint8)
    folder.mkdir(exist_ok=True)
    n = len(labels)
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
        bytes([0, 0, 8, 3]) + np.array([n, 28, 28], ">i4").tobytes() + images.tobytes())
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
        bytes([0, 0, 8, 1]) + np.array([n], ">i4").tobytes() + labels.tobytes())
    return str(folder)


def test_cli_fewshot_and_linear_probe(tmp_path, capsys):
    import json

    from mlpmixer.cli import main

    ckpt = str(tiny_checkpoint(tmp_path / "m.safetensors"))
    data = write_idx_digits(tmp_path / "digits", per_class=40)
    common = ["--data", data, "--workers", "0"]
    assert main(["fewshot", ckpt, *common, "--shots", "1,10", "--draws", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(result) == ["1", "10"]
    assert len(result["10"]["accuracies"]) == 2
    assert result["10"]["mean"] > 0.3  # chance is 0.1
    with pytest.warns(UserWarning, match="holds the --data images the classifier is fitted on"):  # t10k- twice
        assert main(["fewshot", ckpt, *common, "--shots", "5", "--eval-data", data]) == 0
    assert "5-shot" in capsys.readouterr().out
    assert main(["linear-probe", ckpt, *common, "--json"]) == 0
    probe = json.loads(capsys.readouterr().out)
    assert probe["accuracy"] > 0.4 and probe["eval_images"] == 80 and probe["train_images"] == 320
    # The pool holds 20 images per class (half of 40): 21-shot is skipped, saying so, and 5-shot reported.
    with pytest.warns(UserWarning, match="skipped 21-shot: the smallest class of the support pool has 20 images"):
        assert main(["fewshot", ckpt, *common, "--shots", "5,21", "--draws", "1"]) == 0
    out = capsys.readouterr().out
    assert "5-shot" in out and "21-shot" not in out and "1 draw:" in out
    assert main(["fewshot", ckpt, *common, "--shots", "21"]) == 2
    assert "has 20 images, fewer than any of the shot counts 21" in capsys.readouterr().err
    # Options the solver would refuse are refused before any feature is extracted (no progress bar).
    for bad, said in ((["--l2", "0"], "--l2 must be a positive finite number, not 0.0"),
                      # inf fitted zero weights: chance accuracy, printed as a result ("l2": Infinity in the JSON).
                      (["--l2", "inf"], "--l2 must be a positive finite number, not inf"),
                      (["--l2", "nan"], "--l2 must be a positive finite number, not nan"),
                      (["--eval-fraction", "1"], "--eval-fraction must lie strictly between 0 and 1")):
        assert main(["linear-probe", ckpt, *common, *bad]) == 2
        err = capsys.readouterr().err
        assert said in err and "features of --data" not in err
    assert main(["linear-probe", ckpt, *common, "--device", "tpu"]) == 2
    assert "Unsupported device 'tpu'" in capsys.readouterr().err



def test_results_on_shards_do_not_depend_on_the_workers(tmp_path, capsys):
    """DataLoader workers interleave the shards they read, in an order their number decides; the pool split and
    the support draws pick by position, so --workers changed the accuracies."""
    import json

    from test_sources import make_shards

    from mlpmixer.cli import main

    ckpt = str(tiny_checkpoint(tmp_path / "m.safetensors"))
    make_shards(tmp_path / "shards", shards=4, per_shard=12)
    for command, options in (("fewshot", ["--shots", "1,5", "--draws", "2"]), ("linear-probe", [])):
        said = []
        for workers in ("0", "1", "2"):
            assert main([command, ckpt, "--data", str(tmp_path / "shards"), "--workers", workers, "--json",
                         *options]) == 0
            said.append(json.loads(capsys.readouterr().out))
        assert said[0] == said[1] == said[2]


@pytest.mark.parametrize("command", ["fewshot", "linear-probe"])
def test_a_killed_dataloader_worker_is_one_sentence(tmp_path, capsys, monkeypatch, command):
    from test_train import KilledInWorker

    import mlpmixer.data
    from mlpmixer.cli import main

    ckpt = str(tiny_checkpoint(tmp_path / "m.safetensors"))
    monkeypatch.setattr(mlpmixer.data, "load_tensors", lambda *_, **__: None)
    monkeypatch.setattr(mlpmixer.data, "open_source",
                        lambda *_, **__: mlpmixer.data.Source(KilledInWorker(), [str(i) for i in range(10)], 8))
    assert main([command, ckpt, "--data", "elsewhere", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: A DataLoader worker died (DataLoader worker (pid" in err and "rerun the command" in err
    assert "Traceback" not in err and err.count("error") == 1


def test_feature_progress_counts_the_images_of_a_folder(tmp_path, capsys, monkeypatch):
    import io
    import json
    import sys

    from PIL import Image

    from mlpmixer.cli import main

    ckpt = str(tiny_checkpoint(tmp_path / "m.safetensors"))
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(tmp_path / "folder" / name / f"{i}.png")
    class Terminal(io.StringIO):  # progress bars are drawn on terminals only
        def isatty(self) -> bool:
            return True

    with monkeypatch.context() as patch:
        patch.setattr(sys, "stderr", Terminal())
        assert main(["linear-probe", ckpt, "--data", str(tmp_path / "folder"), "--workers", "0", "--json"]) == 0
        assert "12/12 [" in sys.stderr.getvalue()  # the folder's size is known: a bar with a total, in images
    capsys.readouterr()
    # A train/ + val/ pair is evaluated on its val/ without --eval-data.
    (tmp_path / "pair").mkdir()
    (tmp_path / "folder").rename(tmp_path / "pair" / "train")
    for name in ("a", "b"):
        (tmp_path / "pair" / "val" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(tmp_path / "pair" / "val" / name / f"{i}.png")
    assert main(["linear-probe", ckpt, "--data", str(tmp_path / "pair"), "--workers", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["train_images"] == 12 and result["eval_images"] == 4


def test_empty_evaluation_or_support_set_is_one_sentence(tmp_path, capsys):
    """Rounding each class's share could leave one side of the split empty: linear-probe printed "nan%",
    fewshot ended in a traceback from statistics.stdev."""
    from mlpmixer.cli import main

    ckpt = str(tiny_checkpoint(tmp_path / "m.safetensors"))
    data = write_idx_digits(tmp_path / "digits", per_class=3)
    common = ["--data", data, "--workers", "0"]
    for command, fraction, side in (("linear-probe", "0.1", "evaluation set"), ("fewshot", "0.1", "evaluation set"),
                                    ("linear-probe", "0.9", "training (support) set")):
        assert main([command, ckpt, *common, "--eval-fraction", fraction]) == 2
        captured = capsys.readouterr()
        assert f"leaves the {side} empty" in captured.err and "nan" not in captured.out
    with pytest.raises(ValueError, match="at least one evaluation example"):
        fewshot_evaluate(torch.randn(4, 3), torch.arange(4) % 2, torch.randn(0, 3), torch.zeros(0, dtype=torch.long),
                         shots=(1,), num_classes=2)
    with pytest.raises(ValueError, match="at least one example"):
        fit_least_squares(torch.randn(0, 3), torch.zeros(0, dtype=torch.long), 2)


def test_class_mismatch_between_support_and_evaluation_data_names_them(tmp_path, capsys):
    """The message was `mixer eval`'s, about "the model's classes" and fine-tuning a new head, which few-shot
    evaluation does not use."""
    from PIL import Image

    from mlpmixer.cli import main

    ckpt = str(tiny_checkpoint(tmp_path / "m.safetensors"))
    rng = np.random.default_rng(0)
    for split, classes in (("train", "ab"), ("val", "ac")):
        for name in classes:
            (tmp_path / "pair" / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(
                    tmp_path / "pair" / split / name / f"{i}.png")
    assert main(["fewshot", ckpt, "--data", str(tmp_path / "pair"), "--workers", "0", "--shots", "1"]) == 2
    err = capsys.readouterr().err
    assert "(the val/ part of" in err and "class 1 is 'c' instead of 'b'" in err
    assert "model's classes" not in err and "head" not in err
    assert "features of" not in err  # said before any features are extracted, which can take hours


def test_linear_probe_seed_help_names_only_the_split(capsys):
    """linear-probe fits on every training image: its --seed draws no support sets, only the hold-out split."""
    from mlpmixer.cli import main

    helps = {}
    for command in ("linear-probe", "fewshot"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helped = " ".join(capsys.readouterr().out.split())  # argparse wraps the help over several lines
        helps[command] = helped.split("--seed SEED ")[1].split(" --permute ")[0]
    assert "support" not in helps["linear-probe"] and "split of --data" in helps["linear-probe"]
    assert "support draws" in helps["fewshot"]


def _warnings_of(argv):
    """The warnings `mixer argv` gives (it must succeed), as their messages."""
    import warnings

    from mlpmixer.cli import main

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("command", ["fewshot", "linear-probe"])
def test_evaluation_on_the_support_images_is_said(tmp_path, capsys, command):
    """--eval-data that reads the images --data gives (the same path, mnist5k twice, an image folder twice, an
    IDX folder with only t10k- files) measured the classifier on the images it was fitted on, without a word,
    where `mixer eval` says so of a run evaluated on the data it trained on."""
    import os

    from PIL import Image

    ckpt = str(tiny_checkpoint(tmp_path / "m.safetensors"))
    options = ["--workers", "0", "--json"] + (["--shots", "1", "--draws", "1"] if command == "fewshot" else [])
    said = "holds the --data images the classifier is fitted on, so this accuracy includes the images it trained on"

    def warned(data, eval_data):
        found = [w for w in _warnings_of([command, ckpt, "--data", data, "--eval-data", eval_data, *options])
                 if said in w]
        capsys.readouterr()
        assert len(found) <= 1
        return found[0] if found else None

    digits = write_idx_digits(tmp_path / "digits", per_class=4)  # t10k- files only: read for both
    assert warned(digits, digits) == f"--eval-data {digits} {said}; give held-out data for a fair measure."
    assert warned(digits, digits + os.sep)  # another spelling of the same folder
    if command == "fewshot":  # 5,000 images twice: once is enough
        assert warned("mnist5k", "mnist5k")
    other = write_idx_digits(tmp_path / "other", per_class=4)
    assert warned(digits, other) is None
    write_idx_digits(tmp_path / "digits", per_class=3, prefix="train")  # now train- for --data, t10k- to evaluate
    assert warned(digits, digits) is None

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in "ab":
            (tmp_path / "pair" / split / name).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(
                    tmp_path / "pair" / split / name / f"{i}.png")
    folder = str(tmp_path / "pair" / "train")
    assert warned(folder, folder)  # a plain image folder is read whole both times
    os.symlink(folder, tmp_path / "link")
    assert warned(folder, str(tmp_path / "link"))
    assert warned(str(tmp_path / "pair"), folder)  # the train/ part of a pair is that folder
    assert warned(str(tmp_path / "pair"), str(tmp_path / "pair")) is None  # train/ and val/


@pytest.mark.parametrize("command", ["fewshot", "linear-probe"])
def test_an_evaluation_class_without_images_is_said(tmp_path, capsys, command):
    """`mixer eval` (and these commands) say so of an image folder's empty class folder; an IDX --eval-data without
    a digit, or a class whose hold-out rounds to no image, left its class out of the accuracy without a word."""
    ckpt = str(tiny_checkpoint(tmp_path / "m.safetensors"))
    options = ["--workers", "0", "--json"] + (["--shots", "1", "--draws", "1"] if command == "fewshot" else [])
    said = "holds no images: its class has nothing to evaluate"
    data = write_idx_digits(tmp_path / "digits", per_class=4)
    no_sevens = write_idx_digits(tmp_path / "no_sevens", per_class=4, fewer={7: 0})
    messages = [w for w in _warnings_of([command, ckpt, "--data", data, "--eval-data", no_sevens, *options])
                if said in w]
    assert messages == [f"The evaluation part of class 7 (--eval-data {no_sevens}) {said}."]
    # A class of 1 image (fewshot's 0.5) or 2 (linear-probe's 0.2) holds none out: round(0.5) and round(0.4) are 0.
    few = write_idx_digits(tmp_path / "few", per_class=10, fewer={3: 1 if command == "fewshot" else 2})
    messages = [w for w in _warnings_of([command, ckpt, "--data", few, *options]) if said in w]
    assert messages == [f"The evaluation part of class 3 (held out from --data {few}) {said}."]
    assert not [w for w in _warnings_of([command, ckpt, "--data", data, *options]) if said in w]
    capsys.readouterr()


def test_features_of_a_per_token_head_are_mean_pooled_and_damaged_ones_refused():
    """A head that classifies every token (global_pool="") gave (N, S, C) features, which the solver refused only
    after the whole feature pass; the paper's features are mean-pooled over the tokens, whatever the head. NaN
    features gave every class score NaN, all argmax 0: a "chance" accuracy that passed for a result."""
    torch.manual_seed(0)
    pooled = create_model("digits/4", img_size=8, hidden_dim=16, num_blocks=1, tokens_mlp_dim=8,
                          channels_mlp_dim=16, num_classes=3)
    per_token = create_model(pooled.config, global_pool="")
    per_token.load_state_dict(pooled.state_dict())
    images, labels = torch.randn(10, 3, 8, 8), torch.arange(10) % 3
    batches = DataLoader(TensorDataset(images, labels), batch_size=4)
    feats, _ = extract_features(per_token, batches)
    assert feats.shape == (10, 16)
    torch.testing.assert_close(feats, extract_features(pooled, batches)[0], rtol=0, atol=0)
    with torch.no_grad():
        pooled.blocks[0].mlp_channels.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"features of 10 of the 10 images are not finite \(NaN or infinite\)"):
        extract_features(pooled, batches)


def test_solver_edges_are_sentences():
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 4, 4])
    with pytest.raises(ValueError, match="class indices from 0 to 2 \\(num_classes 3\\), not 0 to 4"):
        fit_least_squares(x, y, num_classes=3)
    pool_x, pool_y = torch.randn(20, 4), torch.arange(20) % 2
    # One shot count as a bare int is taken as one (it was "'int' object is not iterable").
    assert list(fewshot_evaluate(pool_x, pool_y, pool_x, pool_y, shots=2, num_classes=2)) == [2]
    with pytest.raises(ValueError, match="1-shot evaluation needs 1 image of every class"):
        fewshot_evaluate(pool_x, pool_y, pool_x, pool_y, shots=1, num_classes=3)


def _with_features(monkeypatch, module, labels, names):
    """Run `module`'s command on fixed features: random ones with `labels`, evaluated on all the classes."""
    torch.manual_seed(0)
    classes = len(names)
    eval_labels = torch.arange(4 * classes) % classes
    monkeypatch.setattr(module, "train_and_eval_features", lambda args: (
        torch.randn(len(labels), 8), labels, torch.randn(len(eval_labels), 8), eval_labels, names))


def test_classes_missing_from_the_training_side_are_named(monkeypatch, capsys):
    from mlpmixer.cli import main
    from mlpmixer.commands import fewshot as fewshot_command
    from mlpmixer.commands import linear_probe

    names = ["ant", "bee", "cat"]
    no_bees = torch.tensor([0, 2] * 6)
    _with_features(monkeypatch, fewshot_command, no_bees, names)
    # It said "fewer than any of the shot counts 1; use fewer shots", which no shot count could mend.
    assert main(["fewshot", "m", "--data", "d", "--shots", "1"]) == 2
    assert ("The support pool (from --data d) holds no images of class 1 (bee); few-shot evaluation needs images "
            "of every class.") in capsys.readouterr().err
    _with_features(monkeypatch, linear_probe, no_bees, names)  # a probe that can never predict a bee: said
    with pytest.warns(UserWarning, match=r"The training images hold none of class 1 \(bee\): the probe can never"):
        assert main(["linear-probe", "m", "--data", "d"]) == 0


def test_draws_that_can_only_be_the_same_are_said(monkeypatch, capsys):
    from mlpmixer.cli import main
    from mlpmixer.commands import fewshot as fewshot_command

    _with_features(monkeypatch, fewshot_command, torch.tensor([0, 1, 2] * 2), ["a", "b", "c"])
    with pytest.warns(UserWarning, match="Every class of the support pool has 2 images, so the 2-shot draws are all "
                                         "the same support set"):
        assert main(["fewshot", "m", "--data", "d", "--shots", "1,2"]) == 0
    assert "± 0.00" in capsys.readouterr().out
    assert "Every class" not in " ".join(_warnings_of(["fewshot", "m", "--data", "d", "--shots", "1"]))


def test_one_class_and_an_unused_eval_fraction_are_said(tmp_path, capsys):
    from mlpmixer.cli import main

    ckpt = str(tiny_checkpoint(tmp_path / "m.safetensors"))
    one = tmp_path / "one" / "seven"
    one.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(one / f"{i}.png")
    for command in ("fewshot", "linear-probe"):  # reported as "1 classes ... 100.00%"
        assert main([command, ckpt, "--data", str(tmp_path / "one"), "--workers", "0"]) == 2
        assert (f"{tmp_path / 'one'} holds one class (seven); a linear classifier needs images of two or more."
                in capsys.readouterr().err)
    digits = write_idx_digits(tmp_path / "digits", per_class=4)
    said = _warnings_of(["linear-probe", ckpt, "--data", digits, "--eval-data", "mnist5k", "--eval-fraction", "7",
                         "--workers", "0", "--json"])  # 7 was taken without a word, and unused
    assert "--eval-fraction is not used: the evaluation images are --eval-data." in said
