"""`mixer bench`, the measurement helpers in mlpmixer.bench, the thread count of the commands that run a model
(free_cores), and benchmarks/gpu_bench.py's CPU smoke run."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Iterator

import pytest
import torch

from mlpmixer import bench as B
from mlpmixer import kernels as K
from mlpmixer import create_model, save_checkpoint
from mlpmixer.cli import build_parser, main
from mlpmixer.variants import variant_config

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*argv: str) -> int:
    args = build_parser(["bench"]).parse_args(["bench", *argv])
    return args.func(args)


def test_bench_json_reports_consistent_throughput(capsys):
    rc = run_cli("--model", "digits/4", "--img-size", "28", "--device", "cpu", "--batch-size", "2",
                 "--warmup", "1", "--repeats", "2", "--iters", "1", "--json")
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    cfg = variant_config("digits/4", img_size=28)
    assert out["dtype"] == "fp32" and out["batch"] == 2 and out["ceiling_tflops"] > 0
    for mode, factor in (("infer", 1), ("train", 3)):
        (case,) = out["modes"][mode]["cases"]
        assert case["repeats"] == 2
        assert case["img_per_s"] == pytest.approx(2 / case["seconds_per_step"])
        # Analytic FLOPs: 2 × MACs per image forward, about 3× that for a training step.
        assert case["tflops"] * 1e12 == pytest.approx(factor * 2 * cfg.macs() * case["img_per_s"], rel=1e-6)
        assert case["pct_of_ceiling"] == pytest.approx(100 * case["tflops"] / out["ceiling_tflops"])
    assert out["environment"]["torch"] == torch.__version__


def test_bench_table_with_fast_path_and_timm(capsys):
    pytest.importorskip("timm")
    rc = run_cli("--model", "S/32", "--img-size", "64", "--device", "cpu", "--batch-size", "2", "--mode", "infer",
                 "--fast", "--vs-timm", "--warmup", "1", "--repeats", "2", "--iters", "1", "--no-ceiling")
    assert rc == 0
    text = capsys.readouterr().out
    assert "Mixer-S/32 fast" in text and "timm mixer_s32_224" in text
    assert "×" in text  # the speed-up against timm


def test_bench_against_timm_computes_timms_gelu(capsys):
    pytest.importorskip("timm")
    common = ("--variant", "S/32", "--img-size", "64", "--device", "cpu", "--batch-size", "1", "--mode", "infer",
              "--warmup", "0", "--repeats", "1", "--iters", "1", "--no-ceiling", "--json")
    for extra, gelu in (((), "tanh"), (("--vs-timm",), "exact"), (("--vs-timm", "--gelu", "tanh"), "tanh"),
                        (("--vs-timm", "mixer_s32_224"), "exact"), (("--vs-timm", "resnet18"), "tanh")):
        assert run_cli(*common, *extra) == 0
        assert json.loads(capsys.readouterr().out)["config"]["gelu"] == gelu


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "tpu"], "Unsupported device"),
        (["--device", "cpu", "--dtype", "fp16"], "fp16 autocast is not supported on the CPU"),
        (["--device", "cpu", "--model", "H/14", "--vs-timm"], "timm has no Mixer matching Mixer-H/14"),
        (["--device", "cpu", "--fast", "--compile"], "alternatives"),
        (["--device", "cpu", "--num-classes", "0", "--mode", "both"], "A training step needs a head"),
        (["--device", "cpu", "--vs-timm", "mixer_s32_224"], r"timm's mixer_s32_224 cannot take 28×28 images \(.*Kernel"),
        # timm's conv floors the grid: one token, 12 of the 28 rows and columns unread, and a ratio reported.
        (["--device", "cpu", "--vs-timm", "mixer_s16_224"], "timm's mixer_s16_224 cuts 28×28 images into 16×16 "
         r"patches, which leave the last 12 rows and 12 columns unread; compare at a multiple of 16×16 \(--img-size\)"),
        (["--device", "cpu", "--vs-timm", "vit_tiny_patch16_224"], "timm's vit_tiny_patch16_224 cuts 28×28 images"),
    ],
)
def test_bench_bad_input_is_one_clear_sentence(argv, message):
    with pytest.raises(ValueError, match=message):
        run_cli("--variant", "digits/4", "--img-size", "28", "--no-ceiling", "--warmup", "0", "--repeats", "1",
                "--batch-size", "1", "--mode", "infer", *argv)


@pytest.mark.parametrize("timm_module, message", [(None, "needs timm"), ("real", "no model named 'no_such_model'")])
def test_bench_checks_timm_before_timing_anything(monkeypatch, timm_module, message):
    def timed(*_args, **_kwargs):
        raise AssertionError("something was timed before the timm model was checked")

    monkeypatch.setattr(B, "matmul_ceiling", timed)
    monkeypatch.setattr(B, "measure", timed)
    if timm_module is None:
        monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed: importing it fails
    with pytest.raises(B.BenchError, match=message):
        run_cli("--model", "S/32", "--img-size", "64", "--device", "cpu", "--vs-timm",
                *(() if timm_module is None else ("no_such_model",)))


def test_bench_cuda_without_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the error cannot occur")
    with pytest.raises(B.BenchError, match="no CUDA GPU"):
        B.resolve_device("cuda")


def test_unknown_dtype():
    with pytest.raises(B.BenchError, match="Unsupported dtype 'fp64'"):
        B.resolve_dtype("fp64", torch.device("cpu"))


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_bf16_units_is_named(monkeypatch, recwarn, native):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    cpu = torch.device("cpu")
    assert (B.slow_bf16(cpu) is None) == native
    assert B.resolve_dtype("bf16", cpu) == torch.bfloat16
    assert [str(w.message) for w in recwarn] == ([] if native else [B.slow_bf16(cpu) + ": --dtype bf16 will measure that emulation."])
    assert B.slow_bf16(torch.device("cuda")) is None


def fake_load(monkeypatch: pytest.MonkeyPatch, busy: float, cores: int = 2) -> None:
    """Make the machine `cores` cores, of which other programs keep `busy` busy (as /proc/stat counts)."""
    readings = itertools.cycle([(0, 0), (round(100 * (cores - busy)), 100 * cores)])  # (idle, all) ticks
    monkeypatch.setattr(B, "_idle_and_total_ticks", lambda: next(readings))
    monkeypatch.setattr(B.os, "cpu_count", lambda: cores)


@pytest.fixture
def two_threads() -> Iterator[None]:
    """torch at 2 intra-op threads during the test, as on an idle 2-core machine; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("busy, free", [(0.0, 2), (0.4, 2), (0.6, 1), (1.0, 1), (2.0, 1)])
def test_free_cores_are_the_idle_ones(monkeypatch, two_threads, busy, free):
    fake_load(monkeypatch, busy)
    assert B.free_cores() == free


def test_free_cores_at_most_torchs_threads_and_all_of_them_without_proc_stat(monkeypatch, two_threads):
    fake_load(monkeypatch, busy=0.0, cores=8)
    assert B.free_cores() == 2  # torch's count (OMP_NUM_THREADS, say) caps it

    def no_proc_stat() -> tuple[int, int]:
        raise FileNotFoundError("/proc/stat")

    monkeypatch.setattr(B, "_idle_and_total_ticks", no_proc_stat)  # not Linux
    assert B.free_cores() == 2


@pytest.mark.parametrize("command", ["eval", "fewshot", "linear-probe"])
def test_commands_that_run_a_model_take_only_the_free_cores(command, monkeypatch, two_threads, tmp_path, capsys):
    """As train does: on a busy 2-core machine one thread evaluated 10,000 digits in 7.3 s, two in 19.6 s."""
    save_checkpoint(create_model("digits/4", img_size=8, patch_size=4, in_chans=1, num_classes=10),
                    tmp_path / "m.safetensors")
    fake_load(monkeypatch, busy=1.0)  # another program holds one of the two cores
    extra = ["--shots", "1", "--draws", "1"] if command == "fewshot" else []
    assert main([command, str(tmp_path / "m.safetensors"), "--data", "mnist5k", "--json", *extra]) == 0
    assert torch.get_num_threads() == 1


def test_bench_on_busy_cores_warns_and_keeps_its_threads(monkeypatch, two_threads, capsys):
    """A benchmark keeps its threads from run to run (they decide the numbers), but on 2 cores of which another
    program held one, the default 2 threads timed digits/7 at 18 img/s against 5,018 with one: it says so."""
    fake_load(monkeypatch, busy=1.0)
    common = ("--model", "digits/4", "--img-size", "28", "--device", "cpu", "--batch-size", "1", "--mode", "infer",
              "--warmup", "0", "--repeats", "1", "--iters", "1", "--no-ceiling")
    with pytest.warns(UserWarning, match="other programs keep 1 of the 2 cores busy, so these timings will be slow "
                                         "and noisy; wait for them, or time on the idle ones with --threads 1."):
        assert run_cli(*common) == 0
    out, err = capsys.readouterr()
    assert torch.get_num_threads() == 2 and "on CPU (" in out and "2 threads," in out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_cli(*common, "--threads", "1") == 0
    assert not [w for w in caught if "cores busy" in str(w.message)]  # asked for: no warning
    out, err = capsys.readouterr()
    assert "1 thread," in out
    # The header names the resolution (only the JSON had it).
    assert any(line.startswith("Mixer-digits/4 at 28×28, fp32, batch 1 on CPU (") for line in out.splitlines())


def test_largest_fitting_batch_halves_until_it_fits_then_bisects():
    tried = []

    def step(batch: int) -> None:
        tried.append(batch)
        if batch > 27:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert B.largest_fitting_batch(step, 160) == 27  # halving alone said 20
    assert tried == [80, 40, 20, 30, 25, 27, 28]
    big = []  # within 1/32 for large batches, where each try builds a model: here 1035 fits, 1036 does not
    assert 1035 - 1035 // 32 <= B.largest_fitting_batch(lambda b: big.append(b) or step(b // 37), 4096) <= 1035
    assert len(big) < 12

    def never(batch: int) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert B.largest_fitting_batch(never, 4) == 0


def test_time_interleaved_alternates_cases_and_takes_medians():
    calls = []
    cpu = torch.device("cpu")
    cases = [B.Case(name, (lambda n=name: calls.append(n)), 4, 1.0, cpu) for name in ("a", "b")]
    B.time_interleaved(cases, repeats=3, iters=2)
    assert calls == ["a", "a", "b", "b"] * 3
    for case in cases:
        assert len(case.times) == 3
        r = case.result()
        assert r["img_per_s"] == pytest.approx(4 / sorted(case.times)[1])


def test_flops_of_other_timm_models_are_counted():
    timm = pytest.importorskip("timm")
    flops = B.timm_flops_per_image(timm.create_model("resnet18"), (224, 224))
    assert flops == pytest.approx(2 * 1.82e9, rel=0.05)  # resnet18: 1.82 GMACs at 224
    # Counted in eval mode: a model in training mode with a 1×1 final map still counts.
    small = B.timm_flops_per_image(timm.create_model("resnet18").train(), (28, 28))
    assert 0 < small < flops


def test_matmul_ceiling_is_a_rate():
    flops = B.matmul_ceiling(torch.device("cpu"), torch.float32, n=128, seconds=0.05)
    assert 1e6 < flops < 1e15


@pytest.mark.parametrize("dtype, emulated, size", [(torch.bfloat16, True, 512), (torch.bfloat16, False, 2048),
                                                   (torch.float32, True, 2048)])
def test_matmul_ceiling_is_small_only_where_bf16_is_emulated(monkeypatch, dtype, emulated, size):
    """An emulated bf16 product of 2048³ takes about 13 s; elsewhere a small product timed on a busy machine
    read low (17 GFLOP/s in fp32), which put the models at 330% of the ceiling."""
    timed = []
    monkeypatch.setattr(B, "product_rate", lambda device, dtype, n, seconds, product=None: timed.append(n) or 1e9)
    monkeypatch.setattr(B, "slow_bf16", lambda device: "emulated" if emulated else None)
    monkeypatch.setitem(K._state, "onednn_off", "off for this test")
    B.matmul_ceiling(torch.device("cpu"), dtype)
    assert timed == [size]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch is built without oneDNN")
@pytest.mark.parametrize("onednn", [True, False])
def test_the_cpu_ceiling_is_the_faster_library_the_fast_path_uses(monkeypatch, onednn):
    """With oneDNN's products in the fast path (AVX-512), the ceiling is the faster of its and PyTorch's, each timed
    for real: MKL's alone put the fast path above 100% of it."""
    rates = []

    def product_rate(device, dtype, n, seconds, product=torch.mm):
        a = torch.randn(64, 64)
        assert torch.allclose(product(a, a), a @ a.t() if product is not torch.mm else a @ a, atol=1e-4)
        rates.append(1e9 * (len(rates) + 1))  # the second library timed is the faster here
        return rates[-1]

    monkeypatch.setattr(B, "product_rate", product_rate)
    monkeypatch.setitem(K._state, "onednn_off", None if onednn else "off for this test")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert B.matmul_ceiling(torch.device("cpu"), torch.float32) == (2e9 if onednn else 1e9)


KEEP_FREED_MEMORY = """
import ctypes, ctypes.util, resource, torch
from mlpmixer.bench import keep_freed_memory

# glibc's own default, pinned: without it, its adaptive threshold sometimes spares these faults by luck.
ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD

def faults():  # minor page faults of a few alternating multi-MiB allocations, as a model's activations
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        a = torch.ones(5 << 20); b = torch.ones(2 << 20); del a; c = torch.ones(6 << 20); del b, c
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

# The fewest of a few rounds: on a busy machine one round in five or so still faulted one allocation in.
faults(); plain = min(faults() for _ in range(3))
took = keep_freed_memory()
faults(); kept = min(faults() for _ in range(3))
print(plain, took, kept)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_keep_freed_memory_stops_page_faults(child_env):
    """In a fresh process (the setting is process-wide): glibc's default faults the pages in again."""
    out = subprocess.run([sys.executable, "-c", KEEP_FREED_MEMORY], capture_output=True, text=True, check=True,
                         env=child_env).stdout.split()
    plain, took, kept = int(out[0]), out[1], int(out[2])
    assert took == "True"
    assert plain > 1000 and kept < plain / 20


def test_gpu_bench_smoke_runs_end_to_end(tmp_path):
    """The GPU script's own code paths, on the CPU with a small model (no compile: slow on 2 cores)."""
    pytest.importorskip("timm")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--smoke", "--skip-compile", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert result["errors"] == {} and result["skipped"] == []
    assert result["items"]["correctness"]["passed"]
    profiled = result["items"]["B/16 training, profiled"]
    assert profiled["wall_ms"] > 0 and (tmp_path / profiled["table"]).read_text().count("aten::") > 5
    names = {r["name"] for r in result["table"]}
    assert {"timm mixer_s32_224", "Mixer(C=64, N=2, P=32) fast"} <= names
    assert all(r["img_per_s"] > 0 for r in result["table"])
    # The table comes last: the output ends with its row for the last measured case.
    assert result["table"][-1]["name"] in proc.stdout.strip().splitlines()[-1]


def test_a_case_whose_compilation_fails_runs_eagerly_and_says_so(monkeypatch, capsys):
    def compile_that_fails(fn, **options):
        def call(*args, **kwargs):
            raise RuntimeError("no C++ compiler here")

        return call

    monkeypatch.setattr(torch, "compile", compile_that_fails)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        assert run_cli("--model", "digits/4", "--img-size", "28", "--device", "cpu", "--batch-size", "2",
                       "--compile", "--no-ceiling", "--warmup", "1", "--repeats", "1", "--iters", "1", "--json") == 0
    modes = json.loads(capsys.readouterr().out)["modes"]
    for mode in ("infer", "train"):
        (case,) = modes[mode]["cases"]
        assert case["name"].endswith("compiled (compile failed: eager)") and case["img_per_s"] > 0
        assert case["compile_failed"] == "RuntimeError: no C++ compiler here"
    # The table's columns line up under the longer name.
    assert run_cli("--model", "digits/4", "--img-size", "28", "--device", "cpu", "--batch-size", "2", "--mode", "infer",
                   "--compile", "--no-ceiling", "--warmup", "1", "--repeats", "1", "--iters", "1") == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("mode"))
    (row,) = [line for line in lines if line.startswith("infer")]
    end = header.index("img/s") + len("img/s")  # the numbers are right-aligned under their headings
    assert row[end - 1].isdigit() and row[end:end + 1] in ("", " ")


def strict_json(text: str) -> dict:
    """Parse as JSON proper: Python's json module would accept NaN and Infinity, which JSON has not."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_bench_json_records_settings_and_flops_per_image(capsys):
    assert run_cli("--model", "digits/7", "--img-size", "28", "56", "--num-classes", "5", "--device", "cpu",
                   "--batch-size", "2", "--mode", "infer", "--warmup", "1", "--repeats", "2", "--iters", "1",
                   "--no-ceiling", "--json") == 0
    out = strict_json(capsys.readouterr().out)
    cfg = variant_config("digits/7", img_size=(28, 56), num_classes=5)
    assert out["config"]["img_size"] == [28, 56] and out["config"]["num_classes"] == 5
    assert (out["warmup"], out["repeats"], out["iters"], out["vs_timm"]) == (1, 2, 1, None)
    (case,) = out["modes"]["infer"]["cases"]
    assert case["gflops_per_image"] == pytest.approx(2 * cfg.macs() / 1e9)


def test_bench_model_whose_flops_cannot_be_counted_gives_valid_json(monkeypatch, capsys):
    pytest.importorskip("timm")
    monkeypatch.setattr(B, "timm_flops_per_image", lambda model, img_size, in_chans=3: None)
    assert run_cli("--model", "digits/4", "--img-size", "32", "--device", "cpu", "--batch-size", "1",
                   "--mode", "infer", "--vs-timm", "resnet18", "--warmup", "0", "--repeats", "1", "--iters", "1",
                   "--json") == 0
    ours, theirs = strict_json(capsys.readouterr().out)["modes"]["infer"]["cases"]
    assert ours["pct_of_ceiling"] > 0
    assert theirs["img_per_s"] > 0
    assert theirs["gflops_per_image"] is theirs["tflops"] is theirs["pct_of_ceiling"] is None


class NotOnMeta(torch.nn.Module):
    """Self-attention of an image's 3 channels (heads) over its 5 rows (tokens) of 8 pixels, refusing the
    meta device as some timm models do (pit_ti_224, cait_xxs24_224)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "meta":
            raise NotImplementedError("no meta tensors here")
        return torch.nn.functional.scaled_dot_product_attention(x, x, x * self.scale)


def test_flops_of_a_model_that_fails_on_meta_are_counted_on_a_real_image():
    # Q·Kᵀ and A·V, 3 heads × 5×5×8 multiply-accumulates each; the CPU's fused attention kernel counts none.
    assert B.timm_flops_per_image(NotOnMeta(), (5, 8)) == 2 * 2 * 3 * 5 * 5 * 8


def test_a_batch_too_large_for_the_cpus_memory_is_one_sentence():
    # 10⁸ images of 3×224×224 floats: 60 TB, which no allocation gets; the error used to be a traceback.
    with pytest.raises(B.BenchError, match="Batch 100000000 does not fit in this machine's memory"):
        run_cli("--model", "S/32", "--device", "cpu", "--batch-size", "100000000", "--mode", "infer",
                "--no-ceiling", "--warmup", "1", "--repeats", "1", "--iters", "1")


def test_a_timm_name_with_a_pretrained_tag_is_a_model():
    pytest.importorskip("timm")
    B.check_timm("resnet18.a1_in1k")  # timm.list_models() lists no tags; create_model takes them
    # A tag the model does not have failed only in create_model, after our cases had warmed up: a traceback.
    with pytest.raises(B.BenchError, match=r"^timm's mixer_b16_224 has no pretrained tag 'bogus' \(its tags: "
                                           r"goog_in21k, .*\); name another, or none.$"):
        B.check_timm("mixer_b16_224.bogus")


def allocating_case(megabytes_per_image: int, fixed_megabytes: int = 0) -> B.Builder:
    """Cases whose step holds `fixed_megabytes` MiB, frees them, then holds `megabytes_per_image` MiB per
    image, and whose build fails from batch 5000."""
    def build(batch: int) -> B.Case:
        if batch >= 5000:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")

        def step() -> None:
            torch.empty(fixed_megabytes << 20, dtype=torch.uint8)
            torch.empty(batch * megabytes_per_image << 20, dtype=torch.uint8)

        return B.Case("allocating", step, batch, None, torch.device("cpu"), held_bytes=lambda: 5 << 20)
    return build


def test_cpu_peak_memory_counts_the_most_held_at_once():
    def step() -> None:
        a = torch.ones(2**20)  # 4 MiB
        b = a * 2  # 8 MiB at once
        del a, b
        torch.ones(3 * 2**20)  # 12 MiB, the peak

    assert B.cpu_peak_allocated(step) == 12 << 20
    case = allocating_case(3)(4)
    B.warm_up(case, 1)
    assert case.peak_memory == (3 * 4 + 5) << 20  # the step's peak and what the case holds between steps


def test_cpu_peak_memory_does_not_depend_on_earlier_profiled_steps():
    # The profiler's "Total Allocated" kept 3 MiB allocated during an earlier profile and freed after it
    # (as an earlier case's optimiser state is): the estimate of a fitting batch then depended on what ran before.
    kept = []
    B.cpu_peak_allocated(lambda: kept.append(torch.empty(3 << 20, dtype=torch.uint8)))
    kept.clear()
    assert B.cpu_peak_allocated(lambda: torch.empty(1 << 20, dtype=torch.uint8)) == 1 << 20


def test_cuda_peak_memory_with_no_warmup_still_counts_a_step(monkeypatch):
    # The CUDA peak is read over the warm-up: with --warmup 0 it was the parameters alone.
    allocated = {"now": 100, "peak": 100}

    def step() -> None:
        allocated["peak"] = max(allocated["peak"], allocated["now"] + 50)

    for name, fn in [("synchronize", lambda device=None: None),
                     ("memory_allocated", lambda device=None: allocated["now"]),
                     ("reset_peak_memory_stats", lambda device=None: allocated.update(peak=allocated["now"])),
                     ("max_memory_allocated", lambda device=None: allocated["peak"])]:
        monkeypatch.setattr(torch.cuda, name, fn)
    case = B.Case("c", step, 1, None, torch.device("cuda"), held_bytes=lambda: 7)
    B.warm_up(case, 0)
    assert case.peak_memory == 50 + 7


def test_bench_reports_peak_memory_on_the_cpu(capsys):
    run_cli("--model", "digits/4", "--img-size", "28", "--device", "cpu", "--batch-size", "4", "--warmup", "1",
            "--repeats", "1", "--iters", "1", "--no-ceiling", "--json")
    modes = json.loads(capsys.readouterr().out)["modes"]
    params = variant_config("digits/4", img_size=28).num_params() * 4
    infer, train = (modes[m]["cases"][0]["peak_memory_gib"] * 2**30 for m in ("infer", "train"))
    # Training holds the weights, their gradients and AdamW's two moments, and the activations for backward.
    assert params < infer < train and train > 4 * params


def test_a_batch_too_large_for_the_cpus_memory_names_one_that_fits(monkeypatch):
    monkeypatch.setattr(B, "memory_available", lambda: 100 << 20)  # 5 MiB held, 1 MiB an image: 95 fit
    with pytest.raises(B.BenchError, match=r"Batch 5000 does not fit in this machine's memory \(an allocation "
                                           r"failed\); about batch 95 fits in the 0.1 GiB available now \(from the "
                                           r"peak memory of smaller batches\): use --batch-size 95\.$"):
        B.prepare(allocating_case(1), 5000, torch.device("cpu"), 1)
    with pytest.raises(B.BenchError, match=r"not even batch 1 fits in the 0.0 GiB available now: use a smaller"):
        monkeypatch.setattr(B, "memory_available", lambda: 4 << 20)
        B.prepare(allocating_case(1), 5000, torch.device("cpu"), 1)
    # Below batch 64 the peak is the fixed 64 MiB: the batches double until the per-image growth shows.
    assert B.cpu_fitting_batch(allocating_case(1, fixed_megabytes=64), 5000, 1000 << 20) == 995
    monkeypatch.setattr(B, "memory_available", lambda: None)  # not Linux
    with pytest.raises(B.BenchError, match=r"allocation failed\); use a smaller --batch-size\.$"):
        B.prepare(allocating_case(1), 5000, torch.device("cpu"), 1)


def test_a_one_channel_model_is_timed_on_one_channel_images_against_timm_too():
    config = variant_config("digits/4", in_chans=1, num_classes=10)
    cpu = torch.device("cpu")
    for mode in ("infer", "train"):
        builders = dict([B.builder(config, mode, cpu, torch.float32)])
        if importlib.util.find_spec("timm"):
            builders.update([B.builder(config, mode, cpu, torch.float32, timm_name="resnet18")])
        cases, _ = B.measure(builders, 2, cpu, 0, 1, 1, log=lambda msg: None)
        assert cases[0].result()["gflops_per_image"] * 1e9 == 2 * config.macs() * (1 if mode == "infer" else 3)
        assert all(c.result()["img_per_s"] > 0 for c in cases)
