"""`CompiledOrEager`: torch.compile that falls back to the model as it is, with one warning."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from mlpmixer.cli import main
from mlpmixer.compiled import CompiledOrEager


class Tiny(torch.nn.Module):  # its own code object: no compiled graph of another test is reused
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


def broken_backend(graph: torch.fx.GraphModule, example_inputs: list) -> None:
    raise RuntimeError("no C++ compiler here")


def test_a_failing_compiler_falls_back_to_the_model_with_one_warning() -> None:
    model = Tiny()
    run = CompiledOrEager(model, backend=broken_backend)
    x = torch.randn(5, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = run(x), run(x)
    assert torch.equal(first, model(x)) and torch.equal(second, model(x))
    assert [str(w.message) for w in caught if "torch.compile failed" in str(w.message)] == [
        f"torch.compile failed ({run.fallback}); running without it."]
    assert "no C++ compiler here" in run.fallback and run.compiled is None


def test_an_error_of_the_model_itself_is_raised_as_it_is() -> None:
    run = CompiledOrEager(Tiny(), backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            run(torch.randn(5, 7))  # the wrong width: eager fails too, so it is not the compiler's fault
    assert not [w for w in caught if "torch.compile failed" in str(w.message)]
    assert run.fallback is None and run.compiled is not None
    assert run.fc.in_features == 4  # other attributes are the model's


def test_train_with_compile_finishes_where_compiling_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def compile_that_fails(fn, **options):
        return lambda *args, **kwargs: broken_backend(None, [])

    monkeypatch.setattr(torch, "compile", compile_that_fails)
    with pytest.warns(UserWarning, match=r"torch.compile failed \(RuntimeError: no C\+\+ compiler here\)"):
        assert main(["train", "--steps", "2", "--batch-size", "32", "--compile", "--processes", "1", "--quiet",
                     "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "model.safetensors").exists()
