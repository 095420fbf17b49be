"""`--tensorboard`: the metrics of metrics.jsonl also go to RUN/tensorboard as TensorBoard scalars."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mlpmixer.cli import main

COMMON = ["train", "--steps", "2", "--batch-size", "32", "--processes", "1", "--quiet"]


def test_tensorboard_gets_the_same_scalars_as_metrics_jsonl(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main([*COMMON, "--tensorboard", "--out", str(run)]) == 0
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    assert {"train/loss", "train/acc", "train/lr", "train/img_per_s", "val/loss", "val/top1", "val/top5"} <= tags
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_row = next(r for r in rows if "train_loss" in r)
    val_row = [r for r in rows if "val_top1" in r][-1]
    (loss,) = board.Scalars("train/loss")
    assert loss.step == train_row["step"] == 2 and loss.value == pytest.approx(train_row["train_loss"], rel=1e-6)
    assert board.Scalars("val/top1")[-1].value == pytest.approx(val_row["val_top1"], rel=1e-6)


def test_without_tensorboard_installed_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    real_import = builtins.__import__

    def no_tensorboard(name: str, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    monkeypatch.delitem(__import__("sys").modules, "torch.utils.tensorboard", raising=False)
    assert main([*COMMON, "--tensorboard", "--out", str(tmp_path / "run")]) != 0
    assert "pip install 'mlpmixer[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # said before anything was written


def test_a_resumed_run_replaces_the_redone_steps(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*COMMON[:2], "20", *COMMON[3:], "--tensorboard", "--save-every", "10", "--out", str(run)]
    assert main(args) == 0
    (run / "checkpoints" / "step-00000020.pt").unlink()  # as if killed between steps 10 and 20
    assert main([*args, "--resume"]) == 0
    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    assert [e.step for e in board.Scalars("train/loss")] == [10, 20]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert board.Scalars("train/loss")[-1].value == pytest.approx(rows[-2]["train_loss"], rel=1e-6)
