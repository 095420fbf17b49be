"""One-shot GPU benchmark of issue 5: correctness first, then plain path, fast path and timm.

Runs from the repository checkout without installing, on a machine with PyTorch, Triton and timm
and no internet:

    PYTHONPATH=src python benchmarks/gpu_bench.py --out RESULTS_DIR

Mixer-B/16 at 224 in bf16 autocast: inference at batch 256, training steps (forward, backward,
fused AdamW) at batch 128 and 256, against timm's mixer_b16_224 eager and compiled; then
Mixer-L/16 and H/14 (ours only), the peak training memory and a bf16 matrix-product ceiling; 5 of the
fast path's B/16 training steps run under PyTorch's profiler (b16_fast_train_profile.txt).
Everything is timed in this one process; cases of one item are interleaved. A time guard skips
what would not finish within --budget seconds (default 430: the whole run must stay under
8 minutes) and says so. The results JSON is rewritten after every item, so a run cut short still
leaves what it measured; the table is printed last.

`--smoke` runs the same code on the CPU with a small model and few iterations (a check that the
script works end to end, not a measurement).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from mlpmixer import bench as B  # noqa: E402
from mlpmixer import kernels as K  # noqa: E402
from mlpmixer.fast import optimize  # noqa: E402
from mlpmixer.model import create_model  # noqa: E402
from mlpmixer.variants import variant_config  # noqa: E402

START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def perturbed(config, device) -> torch.nn.Module:
    """A model whose every parameter (zero head and biases included) is informative."""
    with torch.device(device):
        m = create_model(config)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def profile_steps(name: str, build, batch: int, device: torch.device, out_dir: Path, steps: int = 5) -> dict:
    """Where a training step's time goes: `steps` steps under PyTorch's profiler after 3 unprofiled ones;
    the kernels' time against the wall time, and the busiest operations in `out_dir`/NAME_profile.txt."""
    from torch.profiler import ProfilerActivity, profile

    from mlpmixer.profiling import device_work

    case = build(batch)
    cuda = device.type == "cuda"
    for _ in range(3):
        case.step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            case.step()
        sync()
        wall = (time.perf_counter() - t) / steps
    events = prof.key_averages()
    busy, kernels = device_work(events)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    path = out_dir / f"{name}_profile.txt"
    summary = dict(wall_ms=wall * 1e3, kernel_ms=busy / steps / 1e3, kernels_per_step=kernels / steps,
                   busy_share=busy / steps / 1e6 / wall, table=path.name)
    path.write_text(json.dumps(summary) + "\n\n" + events.table(sort_by=sort, row_limit=40, max_name_column_width=60))
    log(f"    {name}: {summary['wall_ms']:.1f} ms per step under the profiler, the kernels "
        f"{summary['kernel_ms']:.1f} ms ({summary['busy_share']:.0%}) in {summary['kernels_per_step']:.0f} launches")
    return summary


def correctness(config, device, batch: int) -> dict:
    """Fast path against the plain path, on fresh random inputs, bf16 autocast and fp32."""
    out: dict = {}
    bf16 = torch.bfloat16
    for gelu in ("tanh", "exact"):
        cfg = config.replace(gelu=gelu)
        model = perturbed(cfg, device).eval()
        variants = {"fast": optimize(model), "fast_no_graphs": optimize(model, cuda_graphs=False),
                    "fast_cublaslt_gemm": optimize(model, gemm="cublaslt", cuda_graphs=False),
                    "fast_torch_gemm": optimize(model, gemm="torch", cuda_graphs=False)}
        res: dict = {}
        for name, fast in variants.items():
            x = torch.randn(batch, 3, *cfg.img_size, device=device)  # fresh each time
            with torch.no_grad():
                ref32 = model(x)
                with B.autocast(device, bf16):
                    ref, got = model(x), fast(x)
                    x2 = torch.randn_like(x)  # with CUDA graphs, a replay rather than the capture
                    again, ref2 = fast(x2), model(x2)
                res[name] = dict(rel_vs_plain_bf16=rel(got, ref), rel_vs_fp32=rel(got, ref32),
                                 plain_bf16_rel_vs_fp32=rel(ref, ref32), second_call_rel_vs_plain_bf16=rel(again, ref2))
        x = torch.randn(batch, 3, *cfg.img_size, device=device)
        with torch.no_grad():
            res["fp32"] = dict(rel_vs_plain_fp32=rel(optimize(model, cuda_graphs=False)(x), model(x)))
        # Training: gradients of one loss, fast against plain, both bf16, and against fp32.
        model.train()
        x = torch.randn(batch, 3, *cfg.img_size, device=device)
        y = torch.randint(0, cfg.num_classes, (batch,), device=device)

        def grads(run, dtype):
            with B.autocast(device, dtype):
                loss = torch.nn.functional.cross_entropy(run(x).float(), y)
            loss.backward()
            g = torch.cat([p.grad.flatten() for p in model.parameters()])
            model.zero_grad(set_to_none=True)
            return loss.detach(), g

        l32, g32 = grads(model, torch.float32)
        lp, gp = grads(model, bf16)
        lf, gf = grads(optimize(model), bf16)
        res["train"] = dict(grad_rel_vs_plain_bf16=rel(gf, gp), grad_rel_vs_fp32=rel(gf, g32),
                            plain_bf16_grad_rel_vs_fp32=rel(gp, g32),
                            loss_rel_vs_plain_bf16=abs(lf - lp).item() / abs(lp).item())
        out[gelu] = res
        del model, variants
    # Two bf16 computations of the same function differ by their rounding noise, about √2 times each
    # one's distance from fp32. Issue 5's limit between fast and plain, 1e-2, presumes that noise well
    # below it (B/16 on an H100: 4.0e-3 between fast and plain). Where the plain bf16 path is itself
    # noisier (the small --smoke model on the CPU: about 7e-3 from fp32, so fast and plain differed by
    # up to 1.1e-2 in one run of three) the limit widens to 1.5·√2 times that noise. The fast path must
    # also be about as close to the fp32 result as the plain bf16 path is (so a "pass" cannot hide a
    # less accurate path).
    fast = [(v, r) for r in out.values() for k, v in r.items() if k.startswith("fast")]

    def limit(v: dict) -> float:
        return max(1e-2, 1.5 * math.sqrt(2) * v["plain_bf16_rel_vs_fp32"])

    out["worst_rel_vs_plain_bf16"] = max(max(v["rel_vs_plain_bf16"], v["second_call_rel_vs_plain_bf16"]) for v, _ in fast)
    out["limit_rel_vs_plain_bf16"] = max(limit(v) for v, _ in fast)
    out["passed"] = bool(
        all(max(v["rel_vs_plain_bf16"], v["second_call_rel_vs_plain_bf16"]) <= limit(v) for v, _ in fast)
        and all(v["rel_vs_fp32"] <= 1.25 * v["plain_bf16_rel_vs_fp32"] + 1e-3 for v, _ in fast)
        and all(r["fp32"]["rel_vs_plain_fp32"] <= 1e-5 for _, r in fast)
        and all(r["train"]["grad_rel_vs_fp32"] <= 1.25 * r["train"]["plain_bf16_grad_rel_vs_fp32"] + 1e-3
                for _, r in fast)
    )
    out["triton_disabled"] = K._state["disabled_reason"]
    out["cublaslt_disabled"] = K._state["cublaslt_off"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_bench.json")
    ap.add_argument("--smoke", action="store_true", help="tiny run on the CPU, to check the script")
    ap.add_argument("--budget", type=float, default=430.0,
                    help="seconds the run may take after start-up (default 430, so under 8 minutes in all)")
    ap.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile cases")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = START + args.budget

    if args.smoke:
        device, scale = torch.device("cpu"), "smoke"
        b16, l16, h14 = (variant_config("S/32", img_size=64, num_blocks=n, hidden_dim=64, tokens_mlp_dim=32,
                                        channels_mlp_dim=256) for n in (2, 3, 4))
        timm_ref = "mixer_s32_224"
        sizes = dict(infer=4, train=4, train_big=8, big_infer=4, big_train=2)
        warmup, repeats, iters = 1, 2, 1
        est = dict(eager=5, compile=60, big=10)
    else:
        device, scale = torch.device("cuda"), "full"
        b16, l16, h14 = variant_config("B/16"), variant_config("L/16"), variant_config("H/14")
        timm_ref = "mixer_b16_224"
        sizes = dict(infer=256, train=128, train_big=256, big_infer=128, big_train=64)
        warmup, repeats, iters = 3, 5, 5
        est = dict(eager=15, compile=75, big=30)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("No CUDA GPU visible: run with --smoke for the CPU check.", file=sys.stderr)
        return 2
    bf16 = torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (PyTorch's default, made explicit)
    results: dict = dict(scale=scale, environment=B.environment(device), items={}, skipped=[], errors={})
    rows: list[dict] = []
    json_path = out_dir / "gpu_bench.json"

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - START
        results["table"] = rows
        json_path.write_text(json.dumps(results, indent=1, default=str))

    def item(name: str, estimate: float, fn) -> None:
        if time.perf_counter() + estimate > deadline:
            results["skipped"].append(name)
            log(f"SKIPPED {name}: it would not finish within the {args.budget:.0f}s budget")
            save()
            return
        log(f"{name} ...")
        try:
            results["items"][name] = fn()
        except Exception as e:  # one failed item must not cost the rest of the run
            results["errors"][name] = f"{type(e).__name__}: {e}"
            log(f"ERROR in {name}: {type(e).__name__}: {e}")
            traceback.print_exc()
        torch._dynamo.reset()  # compiled models stay referenced by dynamo's caches otherwise
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()

    ceiling = {}

    def timed(config, mode: str, batch: int, specs: list[dict], ceiling_key="bf16") -> dict:
        builders = dict(B.builder(config, mode, device, bf16, **spec) for spec in specs)
        # A case starts only if its warm-up (a compilation, at worst) can still finish in time.
        per_case_deadline = deadline - est["compile" if any(sp.get("compile") for sp in specs) else "big"]
        cases, skipped = B.measure(builders, batch, device, warmup, repeats, iters,
                                   deadline=per_case_deadline, log=log)
        res = {"mode": mode, "batch": batch, "cases": [c.result() for c in cases], "skipped": skipped}
        for r in res["cases"]:
            r["pct_of_ceiling"] = 100 * r["tflops"] * 1e12 / ceiling[ceiling_key] if ceiling.get(ceiling_key) else None
            rows.append(dict(model=config.describe(), mode=mode, **r))
            log(f"    {r['name']:<34} {r['img_per_s']:>10.1f} img/s  "
                f"{r['tflops']:7.1f} TFLOP/s  peak {r['peak_memory_gib'] or 0:6.2f} GiB")
        for c in cases:
            c.step = None  # free the models before the next item
        return res

    item("correctness", 30, lambda: correctness(b16, device, 8 if device.type == "cuda" else 2))

    def measure_ceiling() -> dict:
        ceiling["bf16"] = B.matmul_ceiling(device, bf16, n=None if device.type == "cuda" else 512)
        return {"bf16_tflops": ceiling["bf16"] / 1e12}

    item("matmul ceiling", 10, measure_ceiling)

    ours = [dict(), dict(fast=True)]
    timm_eager = [dict(timm_name=timm_ref, timm_shapes=args.smoke)]
    item("B/16 inference", est["eager"] * 4, lambda: timed(
        b16, "infer", sizes["infer"],
        ours + [dict(fast=True, gemm="cublaslt", name=f"{b16.describe()} fast cublaslt-gemm"),
                dict(fast=True, cuda_graphs=False, name=f"{b16.describe()} fast no-graphs")] + timm_eager))
    item("B/16 training", est["eager"] * 3, lambda: timed(b16, "train", sizes["train"], ours + timm_eager))
    item("B/16 training, big batch", est["eager"] * 3,
         lambda: timed(b16, "train", sizes["train_big"], ours + timm_eager))
    # Where the fast path's training step spends its time (issue 5's 6,000 img/s needs 60% of the ceiling).
    item("B/16 training, profiled", est["eager"], lambda: profile_steps(
        "b16_fast_train", B.builder(b16, "train", device, bf16, fast=True)[1], sizes["train"], device, out_dir))
    for cfg in (l16, h14):
        item(f"{cfg.describe()} inference", est["big"], lambda cfg=cfg: timed(cfg, "infer", sizes["big_infer"], ours))
        item(f"{cfg.describe()} training", est["big"], lambda cfg=cfg: timed(cfg, "train", sizes["big_train"], ours))
    if not args.skip_compile:
        # Compilations last: each takes about a minute; the time guard drops what would not fit,
        # our compiled plain path first (timm compiled is the reference).
        compiled = [dict(timm_name=timm_ref, timm_shapes=args.smoke, compile=True), dict(fast=True), dict(compile=True)]
        item("B/16 inference, compiled", est["compile"],
             lambda: timed(b16, "infer", sizes["infer"], compiled))
        item("B/16 training, compiled", est["compile"],
             lambda: timed(b16, "train", sizes["train"], compiled))
    save()
    print(f"\nJSON: {json_path}   total {time.perf_counter() - START:.0f}s")
    print_table(results, rows, ceiling)
    return 0


def print_table(results: dict, rows: list[dict], ceiling: dict) -> None:
    env = results["environment"]
    print("\n" + "=" * 100)
    print(f"{env.get('gpu') or env.get('processor') or env['machine']}  torch {env['torch']}  "
          f"triton {env.get('triton')}  timm {env.get('timm')}  {env['date']}")
    corr = results["items"].get("correctness")
    if corr:
        t = corr["tanh"]
        print(f"correctness: {'PASSED' if corr['passed'] else 'FAILED'}: bf16 logits, worst rel err fast vs plain "
              f"{corr['worst_rel_vs_plain_bf16']:.2e} (limit {corr['limit_rel_vs_plain_bf16']:.2e}); vs fp32: fast {t['fast']['rel_vs_fp32']:.2e}, "
              f"plain {t['fast']['plain_bf16_rel_vs_fp32']:.2e}; grads vs fp32: fast {t['train']['grad_rel_vs_fp32']:.2e}, "
              f"plain {t['train']['plain_bf16_grad_rel_vs_fp32']:.2e}; fp32 fast vs plain {t['fp32']['rel_vs_plain_fp32']:.1e}; "
              f"Triton kernels {'DISABLED: ' + corr['triton_disabled'] if corr['triton_disabled'] else 'not disabled'}; "
              f"cuBLASLt epilogue {'DISABLED: ' + corr['cublaslt_disabled'] if corr['cublaslt_disabled'] else 'not disabled'}")
    if ceiling.get("bf16"):
        print(f"bf16 matmul ceiling: {ceiling['bf16'] / 1e12:.1f} TFLOP/s")
    for what in ("skipped", "errors"):
        if results[what]:
            print(f"{what}: {results[what]}")
    print(f"{'model':<24}{'mode':<6}{'batch':>6}  {'case':<40}{'img/s':>10}{'TFLOP/s':>9}{'%ceil':>7}{'peak GiB':>9}")
    for r in rows:
        pct = f"{r['pct_of_ceiling']:.0f}" if r.get("pct_of_ceiling") is not None else "-"
        mem = f"{r['peak_memory_gib']:.2f}" if r.get("peak_memory_gib") is not None else "-"
        print(f"{r['model']:<24}{r['mode']:<6}{r['batch']:>6}  {r['name']:<40}{r['img_per_s']:>10.1f}"
              f"{r['tflops']:>9.2f}{pct:>7}{mem:>9}")


if __name__ == "__main__":
    sys.exit(main())
