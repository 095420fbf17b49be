"""CPU benchmark of issue 5: our Mixer (plain and fast path) against timm eager, side by side.

    PYTHONPATH=src python benchmarks/cpu_bench.py [--out benchmarks/results] [--compile]

Mixer-S/16 at batch 16 and B/16 at batch 8, 224×224, fp32 and bf16 autocast, inference and
training steps (forward, backward, AdamW); the cases of one setting are timed interleaved in this
one process, and the ratio to timm eager is reported with a bf16 and fp32 matrix-product ceiling.
The target of issue 5 is ≥ 1.10× timm eager everywhere. Results go to cpu_bench.json (with the
machine, date and versions). A shared or busy machine makes these numbers noisy: rerun on a quiet
one before drawing conclusions. Freed memory is kept in the process (`bench.keep_freed_memory`)
unless `--default-malloc`: with glibc's default, timm's speed depended on which cases ran before it.
`--compile` adds torch.compile of our plain path (minutes of compilation on a small CPU); the default
run takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from mlpmixer import bench as B  # noqa: E402
from mlpmixer.variants import variant_config  # noqa: E402

SETTINGS = [("S/16", 16), ("B/16", 8)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="folder for cpu_bench.json")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    ap.add_argument("--variants", nargs="+", default=[v for v, _ in SETTINGS], choices=[v for v, _ in SETTINGS])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="default: PyTorch's (the physical cores)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of our plain path")
    ap.add_argument("--gelu", default="exact", choices=["exact", "tanh"],
                    help="our models' GELU (default exact, the function timm computes)")
    ap.add_argument("--force-bf16", action="store_true", help="time bf16 even where the CPU has no bf16 unit")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's malloc as it is (by default freed memory stays in the process: no case pays "
                    "page faults whose number depends on the cases before it)")
    args = ap.parse_args()
    device = torch.device("cpu")
    B.set_threads(args.threads)
    kept = not args.default_malloc and B.keep_freed_memory()
    start = time.perf_counter()
    result: dict = dict(environment=B.environment(device), ceilings_gflops={}, settings=[], gelu=args.gelu,
                        freed_memory_kept=kept,
                        note="interleaved in one process; a shared machine makes absolute numbers noisy")
    for name in args.dtypes:
        result["ceilings_gflops"][name] = B.matmul_ceiling(device, B.DTYPES[name]) / 1e9
        print(f"{name} matrix-product ceiling: {result['ceilings_gflops'][name]:.0f} GFLOP/s", flush=True)
    dtypes = list(args.dtypes)
    ceil = result["ceilings_gflops"]
    if "bf16" in dtypes and "fp32" in ceil and ceil["bf16"] < ceil["fp32"] / 4 and not args.force_bf16:
        # Without AVX-512 BF16 or AMX, PyTorch's CPU bf16 products fall back to a scalar loop:
        # the models would take hours, and the comparison would measure that loop, not the models.
        dtypes.remove("bf16")
        result["bf16_skipped"] = (
            f"bf16 products run at {ceil['bf16']:.1f} GFLOP/s on this CPU ({result['environment']['cpu_capability']}, "
            f"no native bf16 matrix unit) against {ceil['fp32']:.0f} GFLOP/s in fp32; bf16 not timed (--force-bf16 to insist)"
        )
        print(result["bf16_skipped"], flush=True)
    rows = []
    for variant, batch in SETTINGS:
        if variant not in args.variants:
            continue
        # timm's Mixers compute the exact GELU; ours must compute the same function to compare speed
        # (PyTorch's CPU kernel for the tanh GELU, the official one, is about 3× slower).
        config = variant_config(variant, gelu=args.gelu)
        timm_name = B.timm_name_for(config)
        for dname in dtypes:
            dtype = B.DTYPES[dname]
            for mode in args.modes:
                specs = [dict(timm_name=timm_name), dict(), dict(fast=True)] + ([dict(compile=True)] if args.compile else [])
                builders = dict(B.builder(config, mode, device, dtype, **spec) for spec in specs)
                print(f"{config.describe()} {dname} {mode} batch {batch}", flush=True)
                cases, _ = B.measure(builders, batch, device, warmup=1, repeats=args.repeats, iters=1)
                res = [c.result() for c in cases]
                timm_speed = res[0]["img_per_s"]
                ceiling = result["ceilings_gflops"][dname]
                for r in res:
                    r["vs_timm_eager"] = r["img_per_s"] / timm_speed
                    r["pct_of_ceiling"] = 100 * r["tflops"] * 1e3 / ceiling
                    rows.append(dict(variant=variant, dtype=dname, mode=mode, **r))
                    print(f"    {r['name']:<28}{r['img_per_s']:8.2f} img/s  {r['vs_timm_eager']:5.2f}× timm  "
                          f"{r['pct_of_ceiling']:4.0f}% of ceiling", flush=True)
                result["settings"].append(dict(variant=variant, batch=batch, dtype=dname, mode=mode, cases=res))
    result["elapsed_s"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_bench.json").write_text(json.dumps(result, indent=1))
    print(f"\n{'variant':<8}{'dtype':<6}{'mode':<7}{'case':<30}{'img/s':>8}{'vs timm':>9}{'% ceil':>8}")
    for r in rows:
        print(f"{r['variant']:<8}{r['dtype']:<6}{r['mode']:<7}{r['name']:<30}{r['img_per_s']:>8.2f}"
              f"{r['vs_timm_eager']:>8.2f}×{r['pct_of_ceiling']:>8.0f}")
    print(f"JSON: {out / 'cpu_bench.json'}  ({result['elapsed_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
