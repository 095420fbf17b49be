"""`mixer bench`: throughput of a Mixer (and optionally timm's) for inference and training steps."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

from ..choices import BENCH_DTYPES
from ..variants import variant_config
from . import at_least, image_size


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Times inference (forward, no gradients) and training steps (forward, cross-entropy, "
        "backward, fused AdamW) on random data after a warm-up; reports the median repeat, the analytic "
        "FLOPs and their share of a matrix-product ceiling measured in the same run."
    )
    p.add_argument("--model", "--variant", dest="variant", default="B/16",
                   help="Mixer variant (default B/16), e.g. S/16, L/16, H/14")
    p.add_argument("--img-size", type=at_least(1), nargs="+", default=None, metavar="N",
                   help="resolution, N or H W (default: the variant's own: 224, or 32 for nano/4 and 28 for "
                   "digits/7, digits/4)")
    p.add_argument("--num-classes", type=at_least(0), default=1000,
                   help="classes of the head (default 1000; 0: no head, --mode infer only)")
    p.add_argument("--batch-size", type=at_least(1), default=None, help="default 128 on CUDA, 8 on the CPU")
    p.add_argument("--mode", choices=["infer", "train", "both"], default="both",
                   help="time inference, training steps or both (default both)")
    p.add_argument("--dtype", choices=BENCH_DTYPES, default=None,
                   help="fp32, or bf16/fp16 autocast (default bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--fast", action="store_true", help="our fast path (mlpmixer.fast.optimize)")
    p.add_argument("--vs-timm", nargs="?", const="auto", default=None, metavar="NAME",
                   help="also time a timm model, interleaved: its matching Mixer by default, or any timm name "
                   "(e.g. vit_base_patch16_224, resnet50)")
    p.add_argument("--gelu", choices=["tanh", "exact"], default=None,
                   help="our model's GELU (default: the official tanh one; exact, timm's function, with "
                   "--vs-timm and a timm Mixer, so both compute the same thing)")
    p.add_argument("--warmup", type=at_least(0), default=3, help="warm-up iterations per case (default 3)")
    p.add_argument("--repeats", type=at_least(1), default=5, help="timed repeats; the median is reported (default 5)")
    p.add_argument("--iters", type=at_least(1), default=3, help="iterations per repeat (default 3)")
    p.add_argument("--threads", type=at_least(1), default=None,
                   help="CPU threads (default: PyTorch's choice, the physical cores; a warning says when other "
                   "programs keep some of them busy)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the matrix-product ceiling")
    p.add_argument("--default-malloc", action="store_true",
                   help="on the CPU, leave glibc's malloc as it is: by default the benchmark keeps freed memory in "
                   "the process, so no case pays page faults whose number depends on what ran before it")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import bench as B

    device = B.resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = B.resolve_dtype(dtype_name, device)
    threads = B.set_threads(args.threads)
    free = B.free_cores() if device.type == "cpu" and args.threads is None else threads
    if free < threads:
        # Threads wait for each other at every operation: one that loses its core to another program stalls the
        # rest, so the timings would be several times too slow (train and eval use the idle cores; a benchmark
        # keeps the same threads from run to run, and says so).
        warnings.warn(f"other programs keep {threads - free} of the {threads} cores busy, so these timings will be "
                      f"slow and noisy; wait for them, or time on the idle ones with --threads {free}.")
    kept = device.type == "cpu" and not args.default_malloc and B.keep_freed_memory()
    if args.num_classes == 0 and args.mode != "infer":
        raise B.BenchError("A training step needs a head to train: give --num-classes 1 or more, or --mode infer.")
    overrides = {"num_classes": args.num_classes}
    if args.img_size:
        overrides["img_size"] = image_size(args.img_size)
    timm_name = None
    if args.vs_timm:
        auto = args.vs_timm == "auto"
        timm_name = B.timm_name_for(variant_config(args.variant, **overrides)) if auto else args.vs_timm
        B.check_timm(timm_name)
    # Against a timm Mixer, the same function: timm computes the exact GELU, whose CPU kernel is about
    # 3× faster than the tanh one's.
    gelu = args.gelu or ("exact" if timm_name and timm_name.startswith("mixer_") else None)
    if gelu:
        overrides["gelu"] = gelu
    config = variant_config(args.variant, **overrides)
    batch = args.batch_size or (128 if device.type == "cuda" else 8)
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print

    result: dict = dict(environment=B.environment(device), variant=config.describe(), config=config.to_dict(),
                        dtype=dtype_name, batch=batch, compile=args.compile, fast=args.fast, vs_timm=timm_name,
                        warmup=args.warmup, repeats=args.repeats, iters=args.iters, modes={})
    if device.type == "cpu":
        result["freed_memory_kept"] = kept
    if not args.no_ceiling:
        log(f"measuring the {dtype_name} matrix-product ceiling ...")
        result["ceiling_tflops"] = B.matmul_ceiling(device, dtype) / 1e12
    modes = ["infer", "train"] if args.mode == "both" else [args.mode]
    for mode in modes:
        builders = dict([B.builder(config, mode, device, dtype, fast=args.fast, compile=args.compile)])
        if timm_name:
            builders.update([B.builder(config, mode, device, dtype, compile=args.compile, timm_name=timm_name)])
        t0 = time.perf_counter()
        cases, _ = B.measure(builders, batch, device, args.warmup, args.repeats, args.iters, log=log)
        rows = [c.result() for c in cases]
        ceiling = result.get("ceiling_tflops")
        for r in rows:
            r["pct_of_ceiling"] = 100 * r["tflops"] / ceiling if ceiling and r["tflops"] is not None else None
            if r["gflops_per_image"] is None:
                log(f"  {r['name']}: torch's FLOP counter could not count this model, so no FLOP/s or utilisation")
        if timm_name and len(rows) == 2:
            rows[0]["speedup_vs_timm"] = rows[0]["img_per_s"] / rows[1]["img_per_s"]
        result["modes"][mode] = dict(cases=rows, seconds=time.perf_counter() - t0)

    if args.json:
        print(json.dumps(result, indent=1, allow_nan=False))  # a NaN would make the output invalid JSON
    else:
        print_table(result)
    return 0


def print_table(result: dict) -> None:
    env = result["environment"]
    threads = f"{env['threads']} thread{'s' * (env['threads'] != 1)}"
    where = env.get("gpu") or f"CPU ({env['cpu_count']} cores, {threads}, {env['cpu_capability']})"
    h, w = result["config"]["img_size"]
    print(f"{result['variant']} at {h}×{w}, {result['dtype']}, batch {result['batch']} on {where}, "
          f"torch {env['torch']}"
          + (", compiled" if result["compile"] else "") + (", fast path" if result["fast"] else "")
          + (", freed memory kept (--default-malloc to leave malloc as it is)" if result.get("freed_memory_kept") else ""))
    unit, scale = ("TFLOP/s", 1.0) if env.get("gpu") else ("GFLOP/s", 1e3)
    if result.get("ceiling_tflops"):
        print(f"matrix-product ceiling: {result['ceiling_tflops'] * scale:.1f} {unit}")
    # As wide as the longest name ("... compiled (compile failed: eager)" included), so the columns line up.
    width = max([34] + [len(r["name"]) + 2 for m in result["modes"].values() for r in m["cases"]])
    print(f"{'mode':<7}{'model':<{width}}{'img/s':>10}{'GFLOP/img':>10}{unit:>10}{'% ceil':>8}{'peak GiB':>10}{'vs timm':>9}")
    for mode, m in result["modes"].items():
        for r in m["cases"]:
            pct = f"{r['pct_of_ceiling']:.0f}" if r.get("pct_of_ceiling") is not None else "-"
            mem = f"{r['peak_memory_gib']:.2f}" if r.get("peak_memory_gib") is not None else "-"
            vs = f"{r['speedup_vs_timm']:.2f}×" if r.get("speedup_vs_timm") else ""
            per_image = f"{r['gflops_per_image']:.3g}" if r["gflops_per_image"] is not None else "-"
            rate = f"{r['tflops'] * scale:.2f}" if r["tflops"] is not None else "-"
            print(f"{mode:<7}{r['name']:<{width}}{r['img_per_s']:>10.1f}{per_image:>10}{rate:>10}{pct:>8}{mem:>10}"
                  f"{vs:>9}".rstrip())
