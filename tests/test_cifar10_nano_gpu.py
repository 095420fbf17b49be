"""benchmarks/cifar10_nano_gpu.py's continuation over device sessions: stopping a run at the time limit,
packing its state into parts small enough to come back, and continuing it bit for bit (on the CPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_sources import make_shards

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "cifar10_nano_gpu.py"
spec = importlib.util.spec_from_file_location("cifar10_nano_gpu", SCRIPT)
nano = importlib.util.module_from_spec(spec)
spec.loader.exec_module(nano)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_run_until_stops_the_command_and_the_processes_it_started() -> None:
    sleeper = "import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; " \
              "time.sleep(60)']); print(child.pid, flush=True); time.sleep(60)"
    code, printed, stopped = nano.run_until([sys.executable, "-c", sleeper], dict(os.environ), 3)
    assert stopped and code != 0
    child = int(printed.split()[0])  # what it printed before it was stopped comes back
    deadline = time.time() + 10
    while not gone(child) and time.time() < deadline:
        time.sleep(0.1)
    assert gone(child)
    assert nano.run_until([sys.executable, "-c", "print('done')"], dict(os.environ), 30) == (0, "done\n", False)


def test_pack_cuts_the_run_into_parts_and_unpack_restores_it(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    (run / "checkpoints").mkdir(parents=True)
    out.mkdir()
    files = {"config.json": b"{}", "metrics.jsonl": b'{"step": 4}\n', nano.RESUME_FILE: b'{"flags": []}',
             "checkpoints/step-00000004.pt": os.urandom(2500)}
    for name, data in files.items():
        (run / name).write_bytes(data)
    (run / "checkpoints" / "step-00000002.pt").write_bytes(b"older")  # only the last state travels
    (run / "model.safetensors").write_bytes(b"not needed")
    parts = nano.pack_run(run, out, part_bytes=1000)
    assert [p.name for p in parts] == [f"resume.tar.{i:02d}" for i in range(len(parts))]
    assert len(parts) >= 3 and all(p.stat().st_size <= 1000 for p in parts)
    assert nano.unpack_run(out, tmp_path / "restored") == {"flags": []}
    restored = tmp_path / "restored"
    assert sorted(str(p.relative_to(restored)) for p in restored.rglob("*") if p.is_file()) == sorted(files)
    assert all((restored / name).read_bytes() == data for name, data in files.items())
    with pytest.raises(SystemExit, match="holds no resume.tar.00"):
        nano.unpack_run(tmp_path / "run", tmp_path / "again")


def script(*args: str) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_resume_from_continues_a_stopped_run_bit_for_bit(tmp_path: Path) -> None:
    data = tmp_path / "shards"
    make_shards(data, shards=2, per_shard=40, classes=3)
    # One uninterrupted run of 8 steps, keeping its states of steps 4 and 8.
    flags = ["--batch-size", "16", "--threads", "1", "--keep", "2", "--holdout", "0.1"]
    script("--data", str(data), "--out", str(tmp_path / "whole"), "--workers", "1", "--steps", "8",
           "--save-every", "4", "--", *flags)
    whole = json.loads((tmp_path / "whole" / "cifar10_nano_gpu.json").read_text())
    assert whole["steps"] == 8 and whole["sessions"][0]["stopped"] is False
    # The same run as if stopped after its state of step 4 (the time limit's kill is timed, so the test
    # makes its result): the state of step 8 gone, packed as the script packs a stopped run.
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "whole" / "runs" / "run", stopped)
    (stopped / "checkpoints" / "step-00000008.pt").unlink()
    sessions = [{**whole["sessions"][0], "saved_step": 4, "stopped": True}]
    probes = {"probes": {"fast": {"img_per_s": 1.0}}, "path": "fast", "epochs_fitting": 3}
    (stopped / nano.RESUME_FILE).write_text(json.dumps(nano.resume_record(whole["run_flags"], sessions,
                                                                          {**whole, **probes})))
    nano.pack_run(stopped, tmp_path)

    printed = script("--data", str(data), "--out", str(tmp_path / "continued"), "--workers", "1",
                     "--resume-from", str(tmp_path))
    assert "continuing the run of 1 earlier session(s) from its state of step 4" in printed
    continued = json.loads((tmp_path / "continued" / "cifar10_nano_gpu.json").read_text())
    assert [(s["first_step"], s["saved_step"]) for s in continued["sessions"]] == [(0, 4), (4, 8)]
    assert continued["holdout_curve"] == whole["holdout_curve"]
    assert {k: continued[k] for k in probes} == probes  # the first session's probes, kept to the end
    a = load_file(tmp_path / "whole" / "cifar10_nano.safetensors")
    b = load_file(tmp_path / "continued" / "cifar10_nano.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_resume_from_takes_no_other_plan(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--resume-from", str(tmp_path),
                           "--steps", "3"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "--resume-from continues with the earlier session's flags" in proc.stderr


def test_probes_only_measures_each_path_and_trains_no_run(tmp_path: Path) -> None:
    make_shards(tmp_path / "shards", shards=1, per_shard=60, classes=3)
    printed = script("--data", str(tmp_path / "shards"), "--out", str(tmp_path / "out"), "--workers", "1",
                     "--probes-only", "--probe-steps", "3", "--", "--batch-size", "16", "--threads", "1",
                     "--holdout", "0.1")
    result = json.loads((tmp_path / "out" / "cifar10_nano_probes.json").read_text())
    assert set(result["probes"]) == set(nano.PROBES) and all(p["img_per_s"] > 0 for p in result["probes"].values())
    assert result["probes"]["fast-graphs"]["flags"] == ["--fast", "--cuda-graphs"]
    losses = [p["train_loss"] for p in result["probes"].values()]  # one seed, one data: the paths agree
    assert max(losses) - min(losses) < 1e-3 * max(losses) and not result["probes"]["fast-graphs"]["warnings"]
    assert "--cuda-graphs needs a CUDA GPU" in printed  # on the CPU the graphed steps run unrecorded
    assert result["path"] in nano.PROBES and "probes only: no run" in printed
    assert not (tmp_path / "out" / "cifar10_nano_gpu.json").exists() and not (tmp_path / "out" / "runs" / "run").exists()


def test_the_augmentation_check_takes_the_runs_own_flags() -> None:
    """The GPU session checks the augmentation the run trains with: --autoaugment among the flags after --
    (or a resumed run's) replaces the recipe's RandAugment there too. On the CPU the check compares the CPU
    with itself: no pixel may differ."""
    r = nano.recipe_of(["--save-every", "1000", "--keep", "1", "--batch-size", "128", "--autoaugment", "cifar10"])
    assert (r.autoaugment, r.randaugment, r.batch_size) == ("cifar10", None, 128)
    assert nano.recipe_of([]).randaugment == 9
    check = nano.check_augmentation("cpu", r)
    assert check["pixels_differing"] == 0 and check["max_grey_levels_vs_cpu"] == 0
    assert all(v > 0 for k, v in check.items() if k.startswith("augment_img_per_s"))
