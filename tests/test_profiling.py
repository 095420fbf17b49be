"""`mixer train --profile N`: the files it writes and its error."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from mlpmixer.profiling import StepProfiler, device_work
from mlpmixer.recipes import get_recipe
from mlpmixer.train import train


def tiny(**changes):
    return get_recipe("mnist5k", **{"batch_size": 32, "evals": 0, **changes})


def test_profile_writes_the_step_times_and_a_timeline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    steps = StepProfiler.steps_needed(3) + 2  # two steps after the profiled ones: the files come once
    train(tiny(steps=steps), tmp_path / "run", progress=False, log=lambda *_: None, profile=3)
    text = (tmp_path / "run" / "profile.txt").read_text()
    summary = text.splitlines()[0]
    assert summary.startswith("3 steps of 32 images after 12 unprofiled ones:")
    assert f"Profile: {summary}." in capsys.readouterr().out  # said once, when the files are written
    per_step, inside = (float(x) for x in re.findall(r"([\d.]+) ms per step", summary))
    between = float(re.search(r"([\d.]+) ms between them", summary).group(1))
    # Host times are the training thread's own, so together they fit in the wall time.
    assert 0 < inside and 0 < between and inside + between <= per_step * 1.05
    assert "Busiest on the host:" in text and "Busiest on the GPU" not in text
    assert "aten::addmm" in text and "aten::mm" in text  # the table lists the matrix products
    trace = json.loads((tmp_path / "run" / "profile.json").read_text())
    assert "Optimizer.step#AdamW.step" in {e.get("name") for e in trace["traceEvents"]}


def test_device_work_counts_each_kernel_once() -> None:
    # As an H200's profile of 20 steps reads: the step annotation spans 802 ms on the device and a
    # LayerNorm backward holds its kernels' time, but the device ran only the kernels and the copies.
    def event(device: DeviceType, us: float, count: int) -> SimpleNamespace:
        return SimpleNamespace(device_type=device, self_device_time_total=us, count=count)

    events = [event(DeviceType.CPU, 802_723, 20), event(DeviceType.CPU, 42_246, 340),
              event(DeviceType.CUDA, 30_351, 320), event(DeviceType.CUDA, 8_911, 320), event(DeviceType.CUDA, 754, 173)]
    assert device_work(events) == (30_351 + 8_911 + 754, 320 + 320 + 173)


def test_a_profile_longer_than_the_run_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--profile 5 needs 17 steps .* this run has 8 left"):
        train(tiny(steps=8), tmp_path / "run", progress=False, log=lambda *_: None, profile=5)
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


def test_a_failing_profiler_stops_profiling_not_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    def broken(self, prof) -> None:
        raise RuntimeError("no profiling here")

    monkeypatch.setattr(StepProfiler, "_write", broken)
    files = train(tiny(steps=StepProfiler.steps_needed(2) + 1), tmp_path / "run", progress=False,
                  log=lambda *_: None, profile=2)
    assert files.model.is_file() and not (tmp_path / "run" / "profile.txt").exists()
    assert "Profiling stopped, training goes on: RuntimeError: no profiling here" in capsys.readouterr().out
