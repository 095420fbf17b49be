"""Throughput measurement: inference and training steps, a matrix-product ceiling, peak memory.

Every measurement runs its warm-up first (compilation, autotuning, allocator growth), then timed
repeats of a few iterations each, with the device synchronised around each repeat; the reported
time is the median repeat. Several cases are timed *interleaved* (repeat 1 of every case, then
repeat 2, ...) so that a machine that speeds up or slows down during the run affects them alike.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import first_line
from .choices import BENCH_DTYPES
from .compiled import CompiledOrEager
from .kernels import cpu_linear_act, onednn_usable
from .variants import MixerConfig, timm_name

DTYPES = dict(zip(BENCH_DTYPES, (torch.float32, torch.bfloat16, torch.float16)))


class BenchError(ValueError):
    """A benchmark that cannot run as asked (device, dtype, memory)."""


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise BenchError("CUDA was asked for but no CUDA GPU is visible to PyTorch; use --device cpu.")
    elif name != "cpu":
        raise BenchError(f"Unsupported device {name!r}; use 'cpu' or 'cuda'.")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise BenchError(f"Unsupported dtype {name!r}; use one of {', '.join(DTYPES)}.")
    dtype = DTYPES[name]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise BenchError(f"{torch.cuda.get_device_name(device)} has no bf16 support; use --dtype fp16 or fp32.")
    if device.type == "cpu" and dtype == torch.float16:
        raise BenchError("fp16 autocast is not supported on the CPU here; use --dtype bf16 or fp32.")
    if dtype == torch.bfloat16 and (reason := slow_bf16(device)):
        warnings.warn(f"{reason}: --dtype bf16 will measure that emulation.", stacklevel=2)
    return dtype


def slow_bf16(device: torch.device) -> Optional[str]:
    """Why bf16 products would be emulated on `device`, many times slower than fp32; None where they are not.

    PyTorch runs CPU bf16 products through oneDNN, which needs AVX-512 (or AMX) for them; elsewhere a
    fallback loop runs them (1.3 GFLOP/s against 138 in fp32 on this project's AVX2 machine).
    """
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no fast bf16 (no AVX-512): its bf16 matrix products are emulated, about 100× slower than fp32"
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Mixed precision the usual way: fp32 weights, products in `dtype` (off for fp32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# ---------------------------------------------------------------------------------------------


EMULATED_SIZE = 512  # matmul_ceiling's product where bf16 is emulated


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: Optional[int] = None, seconds: float = 1.0) -> float:
    """FLOP/s of a big square product in `dtype`: the ceiling the models are measured against.

    Where PyTorch emulates bf16 products (a CPU without bf16 units, `slow_bf16`: about 1 GFLOP/s, so a 2048³
    product takes 13 s and the measurement several), a 512³ product is timed instead: the emulation runs
    at the same rate at any size. Only there: a small product timed on a busy machine reads low, and a low
    ceiling would put the models above 100% of it.

    On CPUs where the fast path multiplies through oneDNN (`kernels.onednn_usable`), the faster of that and
    PyTorch's product: on an AVX-512 EPYC oneDNN's fp32 products beat MKL's by 4-20%, and a ceiling of MKL's
    alone put the fast path above 100% of it.
    """
    n = n or (8192 if device.type == "cuda" else 2048)
    if dtype == torch.bfloat16 and slow_bf16(device):
        n = min(n, EMULATED_SIZE)
    rate = product_rate(device, dtype, n, seconds)
    if onednn_usable(torch.empty(0, device=device, dtype=dtype)):
        rate = max(rate, product_rate(device, dtype, n, seconds, lambda a, b: cpu_linear_act(a, b, None, "none")))
    return rate


def product_rate(device: torch.device, dtype: torch.dtype, n: int, seconds: float,
                 product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.mm) -> float:
    """FLOP/s of an n×n by n×n `product` in `dtype`: the median of as many as `seconds` allows (at least 3)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    product(a, b)  # warm-up: library and allocator set-up
    sync(device)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        t0 = time.perf_counter()
        product(a, b)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One thing to time: `step()` runs one iteration (an inference or a training step)."""

    name: str
    step: Callable[[], object]
    batch: int
    flops_per_image: Optional[float]  # per iteration of this mode (training: about 3× forward); None: uncounted
    device: torch.device
    times: list = field(default_factory=list)
    peak_memory: Optional[int] = None  # bytes
    # What the case holds between iterations (parameters, the optimiser's state once made): allocated
    # before the memory is counted from, so added to the peak.
    held_bytes: Callable[[], int] = lambda: 0
    warmup_s: float = 0.0
    compiled: Optional[CompiledOrEager] = None  # a compiled case: says whether compiling failed

    def result(self) -> dict:
        med = statistics.median(self.times) if self.times else None
        failed = self.compiled.fallback if self.compiled is not None else None
        counted = bool(self.times) and self.flops_per_image is not None
        return dict(
            # A case whose compilation failed ran eagerly: its name says so, not only the warning.
            name=self.name + (" (compile failed: eager)" if failed else ""), compile_failed=failed,
            batch=self.batch, seconds_per_step=med,
            img_per_s=self.batch / med if self.times else None,
            gflops_per_image=None if self.flops_per_image is None else self.flops_per_image / 1e9,
            tflops=self.flops_per_image * self.batch / med / 1e12 if counted else None,
            peak_memory_gib=None if self.peak_memory is None else self.peak_memory / 2**30,
            warmup_s=self.warmup_s, repeats=len(self.times),
        )


def warm_up(case: Case, iters: int) -> None:
    """Run the warm-up iterations, then the case's peak memory: on CUDA the most allocated during the
    warm-up (at least one iteration, so --warmup 0 still measures a step, not only the parameters), on the
    CPU during one more iteration (`cpu_peak_allocated`)."""
    dev = case.device
    t0 = time.perf_counter()
    if dev.type == "cuda":
        sync(dev)
        base, held = torch.cuda.memory_allocated(dev), case.held_bytes()  # the parameters: no optimiser state yet
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(max(iters, 1) if dev.type == "cuda" else iters):
        case.step()
    sync(dev)
    case.warmup_s = time.perf_counter() - t0
    if dev.type == "cuda":
        case.peak_memory = torch.cuda.max_memory_allocated(dev) - base + held
    elif dev.type == "cpu":
        peak = cpu_peak_allocated(case.step)
        case.peak_memory = None if peak is None else case.held_bytes() + peak


def cpu_peak_allocated(step: Callable[[], object]) -> Optional[int]:
    """The most bytes PyTorch's CPU allocator holds at once during a call of `step` beyond what it held
    before: the running sum of the profiler's memory events (bytes allocated, minus bytes freed). Not their
    "Total Allocated": that total is kept across profiling sessions, and memory allocated while profiling
    but freed after it (an earlier case's optimiser state) stays in it for good, so it grew with what ran
    before. (The CPU allocator keeps no peak of its own, and the process's peak resident memory includes
    what earlier cases freed; memory that oneDNN or MKL allocate themselves is not seen.) None, with a
    warning, where the profiler fails."""
    from torch.profiler import ProfilerActivity, profile

    from .profiling import quiet_cpu_profiler

    quiet_cpu_profiler()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        with tempfile.TemporaryDirectory() as folder:  # the events' running totals are only in the trace
            trace = Path(folder) / "trace.json"
            prof.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())["traceEvents"]
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        warnings.warn(f"The CPU peak memory was not measured: the profiler failed ({first_line(e)}).", stacklevel=2)
        return None
    held = peak = 0
    for e in events:
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0:
            held += e["args"]["Bytes"]
            peak = max(peak, held)
    return peak


def time_interleaved(cases: list[Case], repeats: int, iters: int) -> None:
    """Repeat 1 of every case, then repeat 2, ...; each repeat `iters` synchronised iterations."""
    for _ in range(repeats):
        for case in cases:
            sync(case.device)
            t0 = time.perf_counter()
            for _ in range(iters):
                case.step()
            sync(case.device)
            case.times.append((time.perf_counter() - t0) / iters)


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def inference_case(
    name: str, model: nn.Module, batch: int, img_size: tuple[int, int], device: torch.device,
    dtype: torch.dtype, flops_per_image: float, compile: bool = False, in_chans: int = 3,
) -> Case:
    """Forward passes without gradients on one fixed random batch."""
    model = model.to(device).eval()
    run = CompiledOrEager(model) if compile else model
    x = torch.randn(batch, in_chans, *img_size, device=device)

    @torch.no_grad()
    def step() -> torch.Tensor:
        with autocast(device, dtype):
            return run(x)

    return Case(name, step, batch, flops_per_image, device, held_bytes=lambda: param_bytes(model),
                compiled=run if compile else None)


def make_optimizer(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel for all parameters) where this PyTorch has it for the device."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)


def training_case(
    name: str, model: nn.Module, batch: int, img_size: tuple[int, int], device: torch.device,
    dtype: torch.dtype, flops_per_image: float, compile: bool = False, num_classes: int = 1000, in_chans: int = 3,
) -> Case:
    """Forward, cross-entropy, backward and an AdamW step on one fixed random batch."""
    model = model.to(device).train()
    run = CompiledOrEager(model) if compile else model
    opt = make_optimizer(model.parameters())
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    x = torch.randn(batch, in_chans, *img_size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)

    def step() -> None:
        with autocast(device, dtype):
            loss = F.cross_entropy(run(x).float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    def held_bytes() -> int:
        state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        return param_bytes(model) + sum(t.numel() * t.element_size() for t in state)

    return Case(name, step, batch, flops_per_image, device, held_bytes=held_bytes, compiled=run if compile else None)


# ---------------------------------------------------------------------------------------------


def timm_name_for(config: MixerConfig) -> str:
    """timm's model name with the same shapes as `config` (timm has S, B and L, patch 16 and 32)."""
    name = timm_name(config)
    if name is None:
        raise BenchError(
            f"timm has no Mixer matching {config.describe()} (it has S/32, S/16, B/32, B/16, L/32, L/16); "
            "name a timm model explicitly with --vs-timm NAME."
        )
    return name


def check_timm(name: str) -> None:
    """Raise BenchError unless timm is installed and has a model `name`: said before anything is timed."""
    try:
        import timm
    except ImportError as e:
        raise BenchError("--vs-timm needs timm; install it with `pip install timm`.") from e
    if not timm.is_model(name):  # takes pretrained tags too (resnet18.a1_in1k), as create_model does
        raise BenchError(f"timm has no model named {name!r}; see timm.list_models().")
    base, _, tag = name.partition(".")
    # is_model ignores the tag, which create_model then refuses ("Invalid pretrained tag") after our cases warmed up.
    if tag and name not in timm.list_pretrained(f"{base}.*"):
        tags = ", ".join(n.partition(".")[2] for n in timm.list_pretrained(f"{base}.*")) or "none"
        raise BenchError(f"timm's {base} has no pretrained tag {tag!r} (its tags: {tags}); name another, or none.")


def timm_model(name: str, config: MixerConfig, match_shapes: bool = False) -> nn.Module:
    """A randomly initialised timm model (no download) at the Mixer's resolution and class count.

    `match_shapes`: build timm's Mixer (`name` must be one) with exactly `config`'s layer shapes.
    """
    check_timm(name)
    import timm

    if match_shapes:
        from timm.models.mlp_mixer import MlpMixer as TimmMixer

        c = config.hidden_dim
        return TimmMixer(
            num_classes=config.num_classes, img_size=config.img_size, in_chans=config.in_chans,
            patch_size=config.patch_size[0],
            num_blocks=config.num_blocks, embed_dim=c,
            mlp_ratio=(config.tokens_mlp_dim / c, config.channels_mlp_dim / c),
        )
    kwargs = dict(pretrained=False, num_classes=config.num_classes, in_chans=config.in_chans)
    if config.img_size != (224, 224):
        kwargs["img_size"] = config.img_size
    try:
        model = timm.create_model(name, **kwargs)
    except TypeError:  # convolutional models take no img_size
        kwargs.pop("img_size", None)
        model = timm.create_model(name, **kwargs)
    # A patch embedding whose patch does not tile the images floors the grid: it runs, but reads only part of
    # each image, and its img/s would be compared with our model's over the whole image. (Images smaller than a
    # patch fail in the forward below.)
    from timm.layers import PatchEmbed

    for embed in (m for m in model.modules() if isinstance(m, PatchEmbed)):
        (h, w), (ph, pw) = config.img_size, embed.patch_size
        if h >= ph and w >= pw and (h % ph or w % pw) and not getattr(embed, "dynamic_img_pad", False):
            raise BenchError(f"timm's {name} cuts {h}×{w} images into {ph}×{pw} patches, which leave the last "
                             f"{h % ph} rows and {w % pw} columns unread; compare at a multiple of {ph}×{pw} "
                             "(--img-size) or with another timm model.")
    # One image first: a size the model cannot take is one sentence here, not a traceback in the warm-up.
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, config.in_chans, *config.img_size))
    except Exception as e:
        h, w = config.img_size
        raise BenchError(f"timm's {name} cannot take {h}×{w} images ({first_line(e)}); compare at a size it "
                         "takes (--img-size) or with another timm model.") from None
    return model


def timm_flops_per_image(model: nn.Module, img_size: tuple[int, int], in_chans: int = 3) -> Optional[float]:
    """Forward FLOPs (2 × MACs) of any model, counted by torch's FLOP counter; None where it cannot count.

    Counted on the meta device (shapes only: no memory, no time); a model that does not run on meta
    tensors is counted on one real image, with attention in its plain form (the fused CPU attention
    kernel is not one the counter knows, so ViTs would lose their attention products).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        return count_forward_flops(copy.deepcopy(model).to("meta"), img_size, torch.device("meta"), in_chans)
    except Exception:
        pass
    device = next(model.parameters()).device
    try:
        with sdpa_kernel(SDPBackend.MATH):
            return count_forward_flops(model, img_size, device, in_chans)
    except Exception:  # count nothing rather than guess
        return None


def count_forward_flops(model: nn.Module, img_size: tuple[int, int], device: torch.device, in_chans: int = 3) -> float:
    """FLOPs of `model`'s forward pass on one image on `device` (the model is left in eval mode)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.randn(1, in_chans, *img_size, device=device))
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------


def largest_fitting_batch(build_and_step: Callable[[int], None], batch: int) -> int:
    """The largest batch below `batch` (which does not fit) whose step fits in GPU memory, to within 1/32
    of it: halved until one fits, then bisected between that and the last that did not; 0 when even
    batch 1 does not fit."""

    def fits(b: int) -> bool:
        try:
            build_and_step(b)
            return True
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return False

    low, high = batch, batch  # low fits (once found), high does not
    while low > 1:
        low //= 2
        if fits(low):
            break
        high = low
    else:
        return 0
    # Each try builds a model and runs a step: stop within 1/32 rather than try every last batch size.
    while high - low > max(1, low // 32):
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def set_threads(threads: Optional[int]) -> int:
    """CPU threads for intra-op parallelism: the physical cores by default."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _idle_and_total_ticks() -> tuple[int, int]:
    """The CPU time since boot, all cores together, that /proc/stat counts idle (idle + iowait) and in all."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return ticks[3] + ticks[4], sum(ticks)


def free_cores() -> int:
    """The cores that other programs leave idle right now (at least one, at most torch's thread count):
    the intra-op threads to use on a shared machine (train, eval, fewshot and linear-probe set them).

    Intra-op threads wait for each other at every operation; when another program holds one of the
    cores, a thread that loses its core stalls all the others: measured on 2 busy cores, 2 threads ran
    the default job's steps 2-8 times slower than 1 (and evaluated 10,000 digits in 19.6 s against 7.3 s).
    So use only the idle cores, as /proc/stat counts them over a tenth of a second (the load average
    would still count our own previous run).
    """
    cores = torch.get_num_threads()
    try:
        idle0, total0 = _idle_and_total_ticks()
        time.sleep(0.1)
        idle1, total1 = _idle_and_total_ticks()
    except (OSError, ValueError, IndexError):  # not Linux: assume the machine is ours
        return cores
    busy = (os.cpu_count() or cores) * (1 - (idle1 - idle0) / max(1, total1 - total0))
    return max(1, min(cores, math.floor(cores - busy + 0.5)))


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory in the process (Linux only); True if it took effect.

    By default glibc returns large freed blocks to the kernel, so the next step's activations are
    fresh pages, each faulted in and zeroed: timm's Mixer-B/16 took about 112,000 page faults per CPU
    inference batch of 8, about 9% of its time, and how many depends on what the process allocated
    before. Both sides of a comparison then run at speeds that depend on the allocator's history.
    With large blocks served from the heap and the heap never trimmed, no step faults after the first
    (jemalloc or tcmalloc, which Intel recommends for PyTorch on the CPU, behave alike). The process
    keeps its peak memory until it exits.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (e.g. musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    # 32 MiB is the largest mmap threshold glibc accepts on 64-bit; the trim threshold has no limit.
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Machine and versions, stored with every result."""
    import platform

    info = dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), torch=torch.__version__, python=platform.python_version(),
        machine=platform.machine(), processor=cpu_name(), cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(), device=str(device),
        cpu_capability=getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)(),
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    for mod in ("triton", "timm"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


# ---------------------------------------------------------------------------------------------


Builder = Callable[[int], Case]  # batch size -> a ready case


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed: CUDA's OutOfMemoryError or the CPU allocator's RuntimeError."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def prepare(build: Builder, batch: int, device: torch.device, warmup: int) -> Case:
    """Build a case and warm it up; a batch that does not fit in memory is a BenchError, on CUDA naming the
    largest batch that does (`largest_fitting_batch`).

    The CPU gets no such search: a batch the kernel lets us allocate but cannot back gets this process
    (or another) killed by the out-of-memory killer instead of an error, so only a failed allocation is caught.
    """
    try:
        case = build(batch)
        warm_up(case, warmup)
        return case
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not out_of_memory(e):
            raise
    if device.type == "cpu":
        available = memory_available()
        fits = None if available is None else cpu_fitting_batch(build, batch, available)
        if fits is None or available is None:
            advice = "use a smaller --batch-size"
        elif fits == 0:
            advice = f"not even batch 1 fits in the {available / 2**30:.1f} GiB available now: use a smaller model"
        else:
            advice = (f"about batch {fits} fits in the {available / 2**30:.1f} GiB available now (from the peak "
                      f"memory of smaller batches): use --batch-size {fits}")
        raise BenchError(f"Batch {batch} does not fit in this machine's memory (an allocation failed); {advice}.")

    def try_batch(b: int) -> None:
        case = build(b)
        case.step()
        sync(device)

    torch.cuda.empty_cache()
    fits = largest_fitting_batch(try_batch, batch)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    advice = f"the largest that fits is about batch {fits}" if fits else "not even batch 1 fits"
    raise BenchError(
        f"Batch {batch} does not fit in the GPU's memory ({total / 2**30:.0f} GiB); {advice}: "
        f"use --batch-size {fits or 1}{'' if fits else ' with a smaller model'}."
    )


def memory_available() -> Optional[int]:
    """Bytes the kernel could give without swapping (Linux's MemAvailable); None elsewhere."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def cpu_fitting_batch(build: Builder, batch: int, available: int) -> Optional[int]:
    """About the largest batch below `batch` whose step fits in `available` bytes of CPU memory.

    Not found by trying: a batch the kernel lets the process allocate but cannot back ends in the
    out-of-memory killer, not in an error. A step's peak (`cpu_peak_allocated`, after one step that makes
    the optimiser's state) grows with the batch, linearly once the activations outweigh what does not grow
    (the optimiser's temporaries: Mixer-B/16's training peak grew 8 MB from batch 1 to 2, then 111 MB an
    image). So it is measured at batches 1, 2, 4, ... until two doublings add the same per image (within
    10%) or the memory is used up, and extended in a line from there. 0 when batch 1 does not fit; None
    when a peak is unknown or does not grow."""
    sizes: list[int] = []
    peaks: list[int] = []
    slopes: list[float] = []
    b = 1
    while b < batch:
        try:
            case = build(b)
            case.step()
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            break
        peak = cpu_peak_allocated(case.step)
        if peak is None:
            return None
        peak += case.held_bytes()
        del case
        if peaks:
            slopes.append((peak - peaks[-1]) / (b - sizes[-1]))
        sizes.append(b)
        peaks.append(peak)
        steady = len(slopes) > 1 and 0 < slopes[-1] and abs(slopes[-1] - slopes[-2]) <= 0.1 * slopes[-1]
        if peak > available or steady:
            break
        b *= 2
    if not peaks or peaks[0] > available:
        return 0
    if not slopes or slopes[-1] <= 0:
        return None
    return max(0, min(batch - 1, sizes[-1] + math.floor((available - peaks[-1]) / slopes[-1])))


def measure(
    builders: dict[str, Builder], batch: int, device: torch.device, warmup: int, repeats: int, iters: int,
    deadline: Optional[float] = None, log: Callable[[str], None] = print,
) -> tuple[list[Case], list[str]]:
    """Warm up every case (in order), then time them interleaved.

    With a `deadline` (time.perf_counter() value), cases whose warm-up would start after it are
    skipped and named in the returned list, so a time-boxed run ends on time.
    """
    cases, skipped = [], []
    for name, build in builders.items():
        if deadline is not None and time.perf_counter() > deadline:
            skipped.append(name)
            log(f"  skipped {name}: out of time")
            continue
        log(f"  warming up {name} (batch {batch})")
        cases.append(prepare(build, batch, device, warmup))
    time_interleaved(cases, repeats, iters)
    return cases, skipped


def builder(
    config: MixerConfig, mode: str, device: torch.device, dtype: torch.dtype, *, fast: bool = False,
    compile: bool = False, timm_name: Optional[str] = None, timm_shapes: bool = False,
    name: Optional[str] = None, **fast_options,
) -> tuple[str, Builder]:
    """(case name, builder) for our Mixer (plain, `fast` or `compile`d) or a timm model.

    `timm_shapes`: give the timm Mixer `config`'s layer shapes (see `timm_model`).
    `fast_options` go to `fast.optimize` (cuda_graphs, gemm).
    Each build makes a fresh, randomly initialised model directly on the device.
    """
    if mode not in ("infer", "train"):
        raise BenchError(f"Unknown mode {mode!r}; use 'infer' or 'train'.")
    if fast and compile:
        raise BenchError("--fast and --compile are alternatives (the fast path's kernels are not traced); pick one.")
    from .model import create_model

    if timm_name:
        label = f"timm {timm_name}"
    else:
        label = config.describe() + (" fast" if fast else "")
    label = name or label + (" compiled" if compile else "")
    flops = {}

    def build(batch: int) -> Case:
        with torch.device(device):
            if timm_name:
                model = timm_model(timm_name, config, match_shapes=timm_shapes)
            else:
                model = create_model(config)
        if "fwd" not in flops:
            # A timm Mixer has our shapes, so the analytic count holds; other models are counted.
            try:
                same_shapes = timm_name is None or timm_shapes or timm_name == timm_name_for(config)
            except BenchError:
                same_shapes = False
            flops["fwd"] = (2.0 * config.macs() if same_shapes
                            else timm_flops_per_image(model, config.img_size, config.in_chans))
        run: nn.Module = model
        if fast:
            from .fast import optimize

            run = optimize(model, **fast_options)
        make = inference_case if mode == "infer" else training_case
        per_image = None if flops["fwd"] is None else flops["fwd"] * (1 if mode == "infer" else 3)
        kwargs = {"in_chans": config.in_chans} | ({} if mode == "infer" else {"num_classes": config.num_classes})
        return make(label, run, batch, config.img_size, device, dtype, per_image, compile=compile, **kwargs)

    return label, build
