"""`mixer train --profile N`: where N training steps spend their time, with PyTorch's profiler.

Writes RUN/profile.txt (wall time, host time in PyTorch operations and device busy time per step, then
the busiest operations) and RUN/profile.json (the timeline, for https://ui.perfetto.dev or
chrome://tracing). The first steps are left out: they hold compilation, cuDNN/cuBLAS choices and the
allocator's growth, which a long run does not repeat.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

SKIP = 10  # steps run before profiling starts
WARMUP = 2  # steps the profiler runs without recording, as its schedule asks


def quiet_cpu_profiler() -> None:
    """Keep the profiler's own log lines off the CPU user's terminal: a CUDA build of torch without a GPU
    logs "ERROR: gpuGetDeviceCount failed", and torch 2.14 "USDT: profiler_start" and "profiler_stop"
    on every use (levels 4 and 5 of Kineto's; read when the profiler is first used)."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def _self_device_us(event: Any) -> float:
    """An operation's own device time in µs (torch >= 2.4 names it device, older releases cuda)."""
    value = getattr(event, "self_device_time_total", None)
    return float(value if value is not None else getattr(event, "self_cuda_time_total", 0.0))


def device_work(events: Iterable[Any]) -> tuple[float, int]:
    """(µs, count) of the work the device ran: its kernels, copies and fills, each once. Host-side events
    carry device time too (an operation the time of the kernels it launched, an annotation such as
    ProfilerStep# or Optimizer.step# its whole span), so summing over every event counts a kernel two or
    three times: on an H200, 54 ms of "busy" per step where the kernels ran 6.8 ms."""
    on_device = [e for e in events if e.device_type != DeviceType.CPU]
    return sum(_self_device_us(e) for e in on_device), sum(e.count for e in on_device)


class StepProfiler:
    """Call `step()` after every optimiser step; profiles steps SKIP + WARMUP + 1 to SKIP + WARMUP + steps
    of the loop (counted from where it started, also when resuming) and then writes the files."""

    def __init__(self, steps: int, run: Path, device: torch.device, batch_size: int,
                 log: Callable[[str], None] = print) -> None:
        if steps < 1:
            raise ValueError(f"--profile takes a number of steps of at least 1, not {steps}.")
        self.steps, self.run, self.device, self.batch_size, self.log = steps, run, device, batch_size, log
        self.cuda = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        if not self.cuda:
            quiet_cpu_profiler()
        self.seen = 0
        self.t_record, self.wall = 0.0, 0.0  # when recording began; seconds per recorded step
        self.done = False
        with self._or_give_up():
            self.prof = profile(activities=activities, schedule=schedule(wait=SKIP, warmup=WARMUP, active=steps,
                                                                         repeat=1), on_trace_ready=self._write)
            self.prof.start()

    @staticmethod
    def steps_needed(steps: int) -> int:
        """Optimiser steps a run must have left for `steps` profiled ones."""
        return SKIP + WARMUP + steps

    @contextlib.contextmanager
    def _or_give_up(self) -> Iterator[None]:
        """A profiler that fails (no CUPTI on the machine, say) ends profiling, never the training run."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - any failure of a diagnostic must leave the run going
            self.done = True
            self.log(f"Profiling stopped, training goes on: {type(e).__name__}: {e}")

    def step(self) -> None:
        if self.done:
            return
        with self._or_give_up():
            self._step()

    def _step(self) -> None:
        self.seen += 1
        if self.seen == SKIP + WARMUP:  # recording starts with the next step: time it from a quiet device
            self._sync()
            self.t_record = time.perf_counter()
        if self.seen == SKIP + WARMUP + self.steps:
            self._sync()
            self.wall = (time.perf_counter() - self.t_record) / self.steps
        self.prof.step()  # writes the files (on_trace_ready) after the last recorded step
        if self.seen == SKIP + WARMUP + self.steps:
            self.prof.stop()
            self.done = True

    def close(self) -> None:
        """End profiling early (the run ended first): nothing is written."""
        if not self.done:
            self.done = True
            with self._or_give_up():
                self.prof.stop()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _write(self, prof: profile) -> None:
        events = prof.key_averages()
        # The step's own record holds the host time outside every operation: Python and the loop's logic.
        between = sum(e.self_cpu_time_total for e in events if e.key.startswith("ProfilerStep"))
        inside = sum(e.self_cpu_time_total for e in events) - between
        host, python = inside / self.steps / 1000, between / self.steps / 1000  # ms per step
        busy, kernels = device_work(events)
        device = busy / self.steps / 1000
        wall = self.wall * 1000
        summary = (f"{self.steps} steps of {self.batch_size} images after {SKIP + WARMUP} unprofiled ones: "
                   f"{wall:.2f} ms per step ({self.batch_size / self.wall:,.0f} images/s under the profiler); "
                   f"on the host, {host:.2f} ms per step inside PyTorch operations and {python:.2f} ms between them")
        if self.cuda:
            # The host times add up the threads: autograd runs a GPU's backward pass on a thread of its own.
            summary += (f" (all threads); the GPU's {kernels / self.steps:,.0f} kernels and copies per step ran "
                        f"{device:.2f} ms ({device / wall:.0%} of the wall time)")
        tables = []
        # On a GPU, the busiest operations on the device and then on the host: a step whose kernels
        # leave the GPU idle is bound by the host's work of launching them.
        for sort, where in ((("self_device_time_total", "the GPU"), ("self_cpu_time_total", "the host"))
                            if self.cuda else (("self_cpu_time_total", "the host"),)):
            if sort == "self_device_time_total" and not hasattr(events[0], sort):
                sort = "self_cuda_time_total"
            tables.append(f"Busiest on {where}:\n" + events.table(sort_by=sort, row_limit=40, max_name_column_width=60))
        (self.run / "profile.txt").write_text(summary + "\n\n" + "\n\n".join(tables) + "\n")
        prof.export_chrome_trace(str(self.run / "profile.json"))
        self.log(f"Profile: {summary}. Busiest operations: {self.run / 'profile.txt'}; "
                 f"timeline: {self.run / 'profile.json'}")
