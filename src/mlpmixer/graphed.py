"""`mixer train --cuda-graphs`: the training step replayed as one CUDA graph.

Why: a small model's step is bound by the host launching its kernels, not by the GPU running them. A
cifar10-nano step of 512 images on an H200 launched about 550 kernels, which ran 6.8 ms of the step's
41 ms under the profiler (benchmarks/results/cifar10_nano_probe_fast_profile.txt). A CUDA graph
launches a whole recorded step at once; `torch.compile` fuses kernels but still launches each.

PyTorch's whole-network capture, as its CUDA graphs notes describe it: a few steps run eagerly first
(on a side stream, as capture asks; they also make the optimiser's state, cuBLAS's handles and the fast
path's first-call checks), then one step is recorded and every later one replays it. The step reads
its batch from fixed input tensors that each call copies into, and the learning rate from a tensor in
the optimiser's parameter groups. Where the capture fails, the run goes on without graphs, with one
warning. Without CUDA the same step runs without graphs (what the CPU tests check).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Optional

import torch

WARMUP_STEPS = 3  # eager steps before the capture (PyTorch's notes use three)


class GraphedStep:
    """Calls `step(*inputs)` as a training step: eagerly for the first `warmup` calls, then (with
    `capture`) through one recorded CUDA graph. `step` must do the whole step (forward, backward, the
    optimiser's step) on tensors that stay in place, so that a replay repeats it: its inputs are copies
    this object keeps, and `optimizer` must take its learning rate from a tensor (`set_lr`)."""

    def __init__(self, step: Callable[..., None], optimizer: torch.optim.Optimizer, capture: bool,
                 warmup: int = WARMUP_STEPS) -> None:
        self.step, self.optimizer, self.capture, self.warmup = step, optimizer, capture, warmup
        self.inputs: Optional[list[torch.Tensor]] = None
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.calls = 0
        self.lr: Optional[torch.Tensor] = None

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next step, into the one tensor every parameter group reads."""
        if self.lr is None:
            device = next(p for g in self.optimizer.param_groups for p in g["params"]).device
            self.lr = torch.tensor(float(lr), device=device)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
        else:
            self.lr.fill_(lr)

    def __call__(self, *inputs: torch.Tensor) -> None:
        if self.inputs is None:
            self.inputs = [t.clone() for t in inputs]
        else:
            for kept, new in zip(self.inputs, inputs):
                kept.copy_(new, non_blocking=True)
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
        elif self.capture and self.calls > self.warmup:
            self._capture_and_replay()
        else:
            self._eager()

    def _eager(self) -> None:
        with self._side_stream():
            self.step(*self.inputs)
            self.optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def _side_stream(self) -> Iterator[None]:
        if not self.capture:
            yield
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream().wait_stream(side)

    def _capture_and_replay(self) -> None:
        # Gradients set to None before the capture are made by the recorded backward, in the graph's own
        # memory, and overwritten (not added to) by every replay.
        if any(group["lr"] is not self.lr for group in self.optimizer.param_groups):
            raise RuntimeError("GraphedStep.set_lr must come before the step is recorded: a recorded float would "
                               "fix the learning rate for the whole run.")
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            with self._capturable():
                with torch.cuda.graph(graph):
                    self.step(*self.inputs)
        except Exception as e:  # noqa: BLE001 - any failure to record leaves the eager step, never wrong numbers
            torch.cuda.synchronize()
            torch.cuda.set_stream(stream)  # torch.cuda.graph restores it only where the recording ended well
            warnings.warn(f"Capturing the training step as a CUDA graph failed ({type(e).__name__}: {e}); training "
                          "goes on without CUDA graphs.", stacklevel=3)
            self.capture = False
            # A recording that failed after its backward left gradients that no kernel wrote (recording runs
            # nothing): the eager step would add to them. Dropped, they also free the failed graph's memory.
            self.optimizer.zero_grad(set_to_none=True)
            self._eager()  # the recording ran nothing: this step is still to do
            return
        self.graph = graph
        graph.replay()

    @contextlib.contextmanager
    def _capturable(self) -> Iterator[None]:
        """Adam's step refuses to be recorded unless its groups say `capturable`. Only while recording:
        the fused kernel computes the same either way, and a saved state that says so would make a
        resumed run on the CPU refuse to step."""
        groups = self.optimizer.param_groups
        before = [g.get("capturable", False) for g in groups]
        for g in groups:
            g["capturable"] = True
        try:
            yield
        finally:
            for g, value in zip(groups, before):
                g["capturable"] = value
