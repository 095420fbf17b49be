"""`mixer train --cuda-graphs` (graphed.py): on the CPU its steps run unrecorded, so these tests check what
a recorded step computes and how a failed recording falls back; the recording itself needs a GPU
(benchmarks/cifar10_nano_gpu.py probes it there)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from test_sources import make_shards

from mlpmixer.checkpoints import load_checkpoint
from mlpmixer.graphed import GraphedStep
from mlpmixer.recipes import get_recipe
from mlpmixer.train import launch, train

QUIET = dict(progress=False, log=lambda *_: None)


def test_graphed_steps_train_as_the_plain_loop(tmp_path: Path) -> None:
    """The recorded step's own code: one tensor for the learning rate, in-place sums of loss and hits, the
    EMA moved by a tensor, unmixed labels as one-hot targets (CutMix on half the batches), unchanged."""
    make_shards(tmp_path / "shards", shards=2, per_shard=40, classes=4)
    r = get_recipe("cifar10-nano", data=str(tmp_path / "shards"), img_size=8, model="nano/4", holdout=0.1,
                   batch_size=16, steps=6, evals=1, workers=0, ema=0.9, threads=1, warmup=2)
    assert r.augment_on == "device" and 0 < r.mix_prob < 1 and r.optimizer == "adamw"
    plain = train(r, tmp_path / "plain", **QUIET)
    said: list[str] = []
    graphs = train(r.replace(cuda_graphs=True), tmp_path / "graphs", progress=False, log=said.append)
    assert any("--cuda-graphs needs a CUDA GPU" in line for line in said)
    a, b = load_checkpoint(plain.model).state_dict(), load_checkpoint(graphs.model).state_dict()
    compared = [k for k in a if not k.endswith("mlp_tokens.fc2.bias")]  # rounding noise only, as in --fast's test
    assert max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in compared) < 1e-4
    assert b["head.weight"].abs().sum() > 0  # it trained: the head starts at zero

    def logged(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    for x, y in zip(logged(plain.out), logged(graphs.out)):
        assert x.keys() == y.keys() and x["step"] == y["step"]
        for key in ("train_loss", "train_acc", "lr", "val_top1"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4)


@pytest.mark.parametrize("change, refused", [
    (dict(accum=2), "gradient accumulation"), (dict(optimizer="sgd"), "SGD"), (dict(compile=True), "--compile"),
    (dict(processes=2), "several processes"), (dict(grad_checkpointing=True), "--grad-checkpointing"),
])
def test_what_one_recorded_step_cannot_hold_is_refused(tmp_path: Path, change: dict, refused: str) -> None:
    r = get_recipe("mnist5k", steps=2, batch_size=32, evals=0, cuda_graphs=True, **change)
    with pytest.raises(ValueError, match=f"--cuda-graphs records a step of one process without {refused}"):
        launch(r, tmp_path / "run", **QUIET)  # as `mixer train` calls it: --processes forks there
    assert not (tmp_path / "run" / "model.safetensors").exists()


def without_cuda(monkeypatch: pytest.MonkeyPatch, recording: type) -> list:
    """torch.cuda as a recording sees it, on the CPU: `recording` stands in for torch.cuda.graph; returns
    the list of streams set_stream is given."""
    streams: list = []
    monkeypatch.setattr(torch.cuda, "graph", recording)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: "the stream before")
    monkeypatch.setattr(torch.cuda, "set_stream", streams.append)
    monkeypatch.setattr(GraphedStep, "_side_stream", lambda self: contextlib.nullcontext())
    return streams


def test_a_failed_recording_warns_once_and_the_steps_go_on_unrecorded(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a GPU where capture fails: warm-up steps, the failed recording, then eager steps that compute
    what steps never recorded compute."""

    class Recording:  # stands in for torch.cuda.graph: the recording fails, as an unsupported operation makes it
        def __init__(self, graph) -> None:
            pass

        def __enter__(self) -> None:
            raise RuntimeError("operation not permitted when stream is capturing")

        def __exit__(self, *exc) -> None:
            return None

    streams = without_cuda(monkeypatch, Recording)

    def run(capture: bool) -> torch.Tensor:
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 2)
        opt = torch.optim.AdamW(layer.parameters(), fused=True)
        seen = []

        def step(x: torch.Tensor) -> None:
            seen.append(x)
            layer(x).square().sum().backward()
            opt.step()

        stepper = GraphedStep(step, opt, capture=capture, warmup=2)
        for i in range(5):
            stepper.set_lr(0.1 / (i + 1))
            stepper(torch.full((3, 4), float(i)))
            assert layer.weight.grad is None  # each eager step leaves no gradients for the next to add to
        assert all(x is seen[0] for x in seen) and torch.equal(seen[0], torch.full((3, 4), 4.0))  # inputs kept
        assert all(not g["capturable"] for g in opt.param_groups)  # only while recording
        return layer.weight.detach().clone()

    unrecorded = run(capture=False)
    with pytest.warns(UserWarning, match="Capturing the training step as a CUDA graph failed") as warned:
        fallen_back = run(capture=True)
    assert len(warned) == 1
    assert torch.equal(fallen_back, unrecorded)
    assert streams == ["the stream before"]  # the stream the recording left is not the one the run goes on in

    # A learning rate recorded as a float would hold for the whole run: recording needs set_lr first.
    layer = torch.nn.Linear(4, 2)
    stepper = GraphedStep(lambda x: layer(x).sum().backward(), torch.optim.AdamW(layer.parameters()), capture=True,
                          warmup=0)
    with pytest.raises(RuntimeError, match="set_lr must come before the step is recorded"):
        stepper(torch.ones(3, 4))


def test_a_recording_that_fails_after_the_backward_leaves_no_gradients_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """A recording can fail after its backward made the gradients (an operation refused in the clipping, the
    optimiser's step or the EMA, or an invalidated capture that capture_end reports): those gradients are
    memory that no kernel wrote, since a recording runs nothing. The eager step that follows must not add
    its gradients to them."""
    recording = [False]

    class Recording:  # stands in for torch.cuda.graph: the step's code runs, as it does while recording
        def __init__(self, graph) -> None:
            pass

        def __enter__(self) -> None:
            recording[0] = True

        def __exit__(self, *exc) -> None:
            recording[0] = False

    streams = without_cuda(monkeypatch, Recording)

    def run(capture: bool) -> torch.Tensor:
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 2)
        opt = torch.optim.AdamW(layer.parameters(), fused=True)

        def step(x: torch.Tensor) -> None:
            layer(x).square().sum().backward()
            if recording[0]:  # what the recorded backward left: gradients no kernel wrote, then a refusal
                for p in layer.parameters():
                    p.grad.fill_(float("nan"))
                raise RuntimeError("operation not permitted when stream is capturing")
            opt.step()

        stepper = GraphedStep(step, opt, capture=capture, warmup=2)
        for i in range(5):
            stepper.set_lr(0.1 / (i + 1))
            stepper(torch.full((3, 4), float(i)))
        return layer.weight.detach().clone()

    unrecorded = run(capture=False)
    with pytest.warns(UserWarning, match="Capturing the training step as a CUDA graph failed"):
        fallen_back = run(capture=True)
    assert torch.equal(fallen_back, unrecorded)
