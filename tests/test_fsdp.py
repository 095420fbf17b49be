"""`--fsdp`: FSDP2 sharding over 2 CPU processes (gloo) follows one process, saves full weights, resumes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlpmixer import load_checkpoint
from mlpmixer import train as train_module
from mlpmixer.cli import main

ROOT = Path(__file__).resolve().parents[1]
# SGD (its update is linear in the gradient, so the all-reduce's rounding stays at float level; see
# test_train.py) with momentum, whose buffers are optimiser state that resuming must restore.
COMMON = ["train", "--steps", "3", "--batch-size", "32", "--quiet", "--optimizer", "sgd", "--lr", "0.1"]


def _torchrun(*args: str, port: int, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "-m", "mlpmixer", *COMMON, "--fsdp", *args],
                          env=env, cwd=ROOT, timeout=600, capture_output=True, text=True)


def _max_diff(a: Path, b: Path) -> float:
    x, y = load_checkpoint(a).state_dict(), load_checkpoint(b).state_dict()
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.mark.skipif(torch.__version__ < (2, 7) and not torch.cuda.is_available(),
                    reason="FSDP2 runs on the CPU from torch 2.7 (test_fsdp_on_the_cpu_needs_torch_2_7)")
def test_fsdp_over_two_processes_follows_one_and_resumes(tmp_path: Path, child_env: dict) -> None:
    fsdp = tmp_path / "fsdp"
    done = _torchrun("--out", str(fsdp), "--save-every", "1", "--keep", "5", port=29531, env=child_env)
    if "does not average where FSDP asks it to" in done.stderr:  # refused, as it should be (test below)
        pytest.skip(f"the gloo backend of torch {torch.__version__} sums where FSDP averages (pytorch#162338)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert main([*COMMON, "--processes", "1", "--out", str(tmp_path / "one")]) == 0
    # The weights rank 0 gathered and saved are the full model, equal to one process's to float tolerance.
    assert _max_diff(fsdp, tmp_path / "one") < 1e-5
    # Every training state holds the full model and the optimiser state by parameter name.
    state = torch.load(fsdp / "checkpoints" / "step-00000002.pt", weights_only=True)
    assert state["step"] == 2 and state["model"]["head.weight"].shape == (10, 48)
    assert "head.weight" in state["optimizer"]["state"]
    # Resume from step 2 (as after a kill): the sharded run ends where the uninterrupted one did.
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp, resumed)
    (resumed / "checkpoints" / "step-00000003.pt").unlink()
    (resumed / "model.safetensors").unlink()
    done = _torchrun("--out", str(resumed), "--resume", port=29532, env=child_env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _max_diff(resumed, fsdp) == 0.0
    # A run whose config.json is gone, resumed with another model or optimiser: the state itself decides, and
    # says so in one sentence, as without --fsdp.
    (resumed / "config.json").unlink()
    for port, flags, said in ((29533, ["--model", "digits/4"], "holds weights of other shapes than the Mixer-digits/4 "
                                                                "this command builds"),
                              (29534, ["--optimizer", "adamw"], "holds the state of another optimiser than --optimizer "
                                                                "adamw")):
        done = _torchrun("--out", str(resumed), "--resume", *flags, port=port, env=child_env)
        assert done.returncode != 0
        assert done.stderr.count("mixer train: error: ") == 1 and said in done.stderr, done.stderr[-3000:]
        assert str(Path("mlpmixer") / "train.py") not in done.stderr, done.stderr[-3000:]


def test_fsdp_refuses_ema_with_several_processes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([*COMMON, "--fsdp", "--ema", "0.9", "--processes", "2", "--out", str(tmp_path / "run")]) != 0
    assert "--fsdp does not keep EMA weights" in capsys.readouterr().err


def test_fsdp_in_one_process_says_it_trains_unsharded(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([*COMMON, "--fsdp", "--processes", "1", "--out", str(tmp_path / "run")]) == 0
    assert "in one process it trains unsharded" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "run").num_classes == 10


def test_fsdp_on_the_cpu_needs_torch_2_7(tmp_path: Path, capsys: pytest.CaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Seen: torch 2.4 and 2.5's FSDP2 ask for CUDA streams whatever the device; 2.6's wants stream events that
    # the CPU lacks. Without this check, a traceback from inside FSDP.
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.6.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*COMMON, "--fsdp", "--processes", "2", "--out", str(tmp_path / "run")]) != 0
    assert "--fsdp on the CPU needs torch >= 2.7 (the FSDP2 of torch 2.6.0" in capsys.readouterr().err


def test_fsdp_refuses_a_gloo_that_does_not_average(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # As torch 2.7.1's gloo does: its reduce-scatter sums where FSDP asks for an average (the probe itself
    # runs for real in the two-process test above).
    monkeypatch.setattr(train_module, "_gloo_averages", lambda: False)
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.7.1"))  # past the version check
    assert main([*COMMON, "--fsdp", "--processes", "2", "--out", str(tmp_path / "run")]) != 0
    assert "does not average where FSDP asks it to (pytorch/pytorch#162338), so --fsdp would train with 2× the " \
           "gradients" in capsys.readouterr().err


def test_the_gloo_probe_gives_no_warning(tmp_path: Path) -> None:
    """torch's FutureWarning that reduce_scatter_tensor is deprecated was printed by every rank of an --fsdp run."""
    import warnings

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert train_module._gloo_averages()
    finally:
        dist.destroy_process_group()
