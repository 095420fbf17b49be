"""The `cifar10-nano` recipe on one GPU, over one or more device sessions: issue 3's accuracy target.

Trains SPEC §3's Mixer-nano (patch 4 at 32×32) on the 50,000 CIFAR-10 training images with the
recipe's augmentation on the GPU (`augment_on="device"`; first checked against the CPU's, as the run's
flags set it) and bf16 autocast (fp32 on a CPU without fast
bf16 products), holding out 2% for validation, and records the hold-out accuracy, the throughput and
the time. The target (>= 91% top-1) is on the CIFAR-10 test set, which is not in this repository: the
trained model is written next to the results, to be checked there (`mixer eval MODEL --data
CIFAR10_TEST`).

Three short probes (--probe-steps each, default 150) measure the steady images/s first, of the plain
training path, of the fast path (`--fast`: fused kernels) and of the fast path with each step replayed
as one CUDA graph (`--fast --cuda-graphs`), and profile 20 of their steps (`mixer train --profile`; the
tables are written to probe_NAME_profile.txt), and record their training losses, which should agree (one seed,
one data) and a failed CUDA-graph recording's warning. `--probes-only` stops there (cifar10_nano_probes.json).
The run then takes the fastest path and
the recipe's whole schedule, saving a training state every --save-every steps. If the schedule does not
fit in --budget seconds (the whole script), the run is stopped there and its last state is written to
--out as resume.tar.00, resume.tar.01, ... (a device run brings back files of at most 16 MiB); a later
session continues it with `--resume-from DIR`, DIR holding those parts, with no probes and the same
flags. --fit-budget instead cuts the epochs to what fits, for a finished model in one session. The
device machine has no webdataset/braceexpand and no ../shared, so carry their wheels and a copy of the
shards:

    mkdir -p .whl .devdata && cp -r ../shared/data/cifar10 .devdata/
    .venv/bin/pip download --no-deps -d .whl webdataset braceexpand
    # device run, carry [".whl", ".devdata"]:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
      PYTHONPATH=src:/tmp/site python3 benchmarks/cifar10_nano_gpu.py --data .devdata/cifar10 --out $OUT
    # later, with the parts copied to .devdata/resume/:
    ... benchmarks/cifar10_nano_gpu.py --data .devdata/cifar10 --out $OUT --resume-from .devdata/resume

`--steps N` replaces the probes and the epoch count by N steps (a check that the script works, e.g.
on the CPU; not a measurement). Flags after `--` go to `mixer train` for the probes and the run, to try
a variant of the recipe (e.g. `-- --batch-size 1024 --lr 4e-3`); the JSON records them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from mlpmixer.recipes import Recipe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's mlpmixer, installed or not
START = time.perf_counter()
PROFILED_STEPS = 20  # of the probe, with `mixer train --profile`: where a step's time goes
PART_BYTES = 15 * 2**20  # a device run brings back files of at most 16 MiB
RESUME_FILE = "resume.json"  # in the run: its `mixer train` flags, the sessions so far and the first's probes
# What the first session measured before training (the probes and the path they chose): carried in
# RESUME_FILE, so that the JSON of the session that finishes the run still holds them.
FIRST_SESSION_KEYS = ("probes", "path", "epochs_fitting")  # and every probe_NAME_profile, probe_NAME_error
PROBES = {"plain": [], "fast": ["--fast"], "fast-graphs": ["--fast", "--cuda-graphs"]}  # name: `mixer train` flags


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", flush=True)


def run_until(cmd: list[str], env: dict[str, str], seconds: Optional[float]) -> tuple[int, str, bool]:
    """Run `cmd` for at most `seconds` (None: no limit); past them, kill it and every process it started.
    Returns (exit status, its output, whether it was stopped). Killing loses nothing saved: `mixer train`
    writes its states atomically, and resumes from the last one bit for bit (on the CPU)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: the DataLoader workers go too
    try:
        printed, _ = proc.communicate(timeout=seconds)
        return proc.returncode, printed, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        printed, _ = proc.communicate()
        return proc.returncode, printed, True


def train(data: str, run: Path, workers: int, bf16: bool, flags: list[str], resume: bool = False,
          seconds: Optional[float] = None) -> tuple[list[dict], float, list[str], bool]:
    """`mixer train --recipe cifar10-nano` in a subprocess (this checkout's code), for at most `seconds`:
    its metrics, wall time, printed lines and whether it was stopped at the time limit."""
    if not resume:
        shutil.rmtree(run, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "mlpmixer", "train", "--recipe", "cifar10-nano", "--data", data, "--workers",
           str(workers), "--out", str(run), "--quiet", *(["--bf16"] if bf16 else []), *flags,
           *(["--resume"] if resume else [])]
    log(" ".join(cmd[2:]))
    t = time.perf_counter()
    code, printed, stopped = run_until(cmd, env, seconds)
    print(printed, end="", flush=True)
    if code and not stopped:
        raise RuntimeError(f"mixer train failed (exit {code}); its output is above.")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line] \
        if (run / "metrics.jsonl").exists() else []
    return rows, time.perf_counter() - t, printed.splitlines(), stopped


def pack_run(run: Path, out: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """What a later session needs to continue `run` (its configuration, metrics, `resume.json` and last
    training state), as one tar cut into parts of at most `part_bytes`: a device run brings back files
    of 16 MiB at most, and Mixer-nano's state (weights, Adam's moments, EMA) is about 18 MB."""
    from mlpmixer.train import latest_state

    state = latest_state(run)
    if state is None:
        return []
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in (run / "config.json", run / "metrics.jsonl", run / RESUME_FILE, state):
            tar.add(path, arcname=str(path.relative_to(run)))
    data = buffer.getvalue()
    parts = []
    for i in range(0, len(data), part_bytes):
        parts.append(out / f"resume.tar.{i // part_bytes:02d}")
        parts[-1].write_bytes(data[i:i + part_bytes])
    return parts


def unpack_run(parts_dir: Path, run: Path) -> dict:
    """The run that `pack_run` wrote into `parts_dir`, restored as `run`; returns its `resume.json`."""
    parts = sorted(parts_dir.glob("resume.tar.[0-9][0-9]"))
    if not parts:
        raise SystemExit(f"{parts_dir} holds no resume.tar.00, resume.tar.01, ...: copy there the parts that "
                         "the earlier session's --out brought back.")
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        tar.extractall(run, filter="data")  # our own files; the filter refuses paths outside `run` anyway
    return json.loads((run / RESUME_FILE).read_text())


def resume_record(flags: list[str], sessions: list[dict], result: dict) -> dict:
    """The RESUME_FILE of a stopped run: how to continue it, and what its first session measured."""
    first = {k: v for k, v in result.items() if k in FIRST_SESSION_KEYS or k.startswith("probe_")}
    return {"flags": flags, "sessions": sessions, "first": first}


def steady_speed(rows: list[dict]) -> float:
    """Median images/s of the logged intervals, the first three (warm-up) left out where there are more."""
    speeds = [r["img_per_s"] for r in rows if "img_per_s" in r]
    return statistics.median(speeds[3:] if len(speeds) > 5 else speeds)


def recipe_of(flags: list[str]) -> Recipe:
    """The recipe `mixer train --recipe cifar10-nano FLAGS` trains with."""
    from mlpmixer.commands.train import add_training_flags, recipe_from_args

    parser = argparse.ArgumentParser()
    add_training_flags(parser, "cifar10-nano")
    return recipe_from_args(parser.parse_known_args(flags)[0])


def check_augmentation(device: str, r: Recipe) -> dict:
    """The run's batch augmentation on `device` against the CPU with the same draws (2,048 images), and
    its speed there in calls of 2,048 images and of `train.AUGMENT_CHUNK["cuda"]` (what training applies
    at once on a GPU). The draws are made on the CPU, so only float rounding may differ: a grey level in
    the crop's resampling, which a threshold (solarize, posterize, equalize) or a nearest-pixel choice may
    enlarge, in a few pixels."""
    import torch

    from mlpmixer.batch_augment import BatchAugment
    from mlpmixer.train import AUGMENT_CHUNK

    aug = BatchAugment(r.img_size, tuple(r.crop_area), r.flip, r.randaugment, r.pad_crop, r.autoaugment)
    out = {}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for n_images in (2048, AUGMENT_CHUNK["cuda"]):
        images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        draws = aug.draw(len(images), 32, 32, torch.Generator().manual_seed(1))
        on_device = images.to(device)
        if n_images == 2048:
            levels = ((aug.apply(on_device, draws).cpu() - aug.apply(images, draws)).abs() * 127.5).round()
            out.update(max_grey_levels_vs_cpu=int(levels.max()), pixels_differing=float((levels > 0).float().mean()))
        aug.apply(on_device, draws)  # warm-up
        sync()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < 2:
            aug.apply(on_device, draws)
            n += len(images)
        sync()
        out[f"augment_img_per_s_in_calls_of_{n_images}"] = round(n / (time.perf_counter() - start))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"), help="the CIFAR-10 shards")
    p.add_argument("--out", required=True, help="folder for cifar10_nano_gpu.json, the trained model and the runs")
    p.add_argument("--budget", type=float, default=540, help="seconds the whole script may take (default 540)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="decoding workers")
    p.add_argument("--probe-steps", type=int, default=150, help="steps of the speed probe")
    p.add_argument("--steps", type=int, help="train only this many steps, no probe (a check, not a measurement)")
    p.add_argument("--probes-only", action="store_true", help="run the probes, write cifar10_nano_probes.json and stop")
    p.add_argument("--fit-budget", action="store_true",
                   help="cut the recipe's epochs to what fits in --budget (a finished model in one session) instead "
                        "of training its whole schedule, continued over sessions")
    p.add_argument("--save-every", type=int, default=200, metavar="N",
                   help="save a training state every N steps (default 200): what a run stopped at --budget keeps")
    p.add_argument("--resume-from", metavar="DIR", help="continue the run whose parts (resume.tar.00, ...) an "
                   "earlier session's --out brought back, with that session's flags")
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="after --: flags for `mixer train`")
    args = p.parse_args()
    train_flags = args.train_flags[1:] if args.train_flags[:1] == ["--"] else args.train_flags
    if args.probes_only and args.steps:
        raise SystemExit("--steps trains without probes; give --probes-only or --steps, not both.")
    if args.resume_from and (train_flags or args.steps or args.fit_budget or args.probes_only):
        raise SystemExit("--resume-from continues with the earlier session's flags; give no --steps, --fit-budget, "
                         "--probes-only or flags after --.")

    import torch

    from mlpmixer.recipes import get_recipe
    from mlpmixer.train import latest_state

    bf16 = torch.cuda.is_available()  # on a CPU without bf16 products (this project's) it is ~100× slower

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'unknown'})"
    log(f"{device}, torch {torch.__version__}, {os.cpu_count()} CPU cores")
    result: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
                    "torch": torch.__version__, "recipe": "cifar10-nano", "train_flags": train_flags, "bf16": bf16,
                    "augment_on": "device"}
    work = out / "runs"  # under --out, so that a run cut short still leaves its metrics.jsonl
    run = work / "run"
    saved = unpack_run(Path(args.resume_from), run) if args.resume_from else None
    if torch.cuda.is_available():
        check = check_augmentation("cuda", recipe_of(saved["flags"] if saved else train_flags))
        speeds = ", ".join(f"{v:,} img/s in calls of {k.rsplit('_', 1)[1]}" for k, v in check.items()
                           if k.startswith("augment_img_per_s"))
        log(f"augmentation on the GPU vs the CPU: {check['pixels_differing']:.4%} of the pixels differ, by at "
            f"most {check['max_grey_levels_vs_cpu']} grey levels; {speeds}")
        result["augmentation_check"] = check
        if check["pixels_differing"] > 0.01:
            log("WARNING: more than 1% of the pixels differ: more than rounding; look into it before trusting the run")
    recipe_epochs = get_recipe("cifar10-nano").epochs
    saves = ["--save-every", str(args.save_every), "--keep", "1"]  # before the flags after --, which may change them
    sessions: list[dict] = []
    if saved:
        flags, sessions = saved["flags"], saved["sessions"]
        result.update(saved.get("first", {}))
        log(f"continuing the run of {len(sessions)} earlier session(s) from its state of step "
            f"{sessions[-1]['saved_step']}: {' '.join(flags)}")
    elif args.steps:
        flags = [*saves, *train_flags, "--steps", str(args.steps)]
    else:
        # The probes validate once, at their end. Not under --out: a device run brings back 8 files at most.
        config = Path(tempfile.mkdtemp()) / "no-evals.json"
        config.write_text(json.dumps({"evals": 0}))
        profile = ["--profile", str(PROFILED_STEPS)] if args.probe_steps >= 3 * PROFILED_STEPS else []
        probes = {}
        for name, path_flags in PROBES.items():
            try:
                rows, seconds, printed, stopped = train(
                    args.data, work / f"probe-{name}", args.workers, bf16,
                    [*train_flags, *path_flags, "--steps", str(args.probe_steps), "--config", str(config), *profile],
                    seconds=args.budget / 4)
                if stopped:
                    raise RuntimeError(f"the probe did not finish within {args.budget / 4:.0f} s")
            except RuntimeError as e:  # one path failing leaves the other
                log(f"probe {name}: {e}")
                result[f"probe_{name}_error"] = str(e)
                continue
            if (work / f"probe-{name}" / "profile.txt").exists():  # the busiest operations come back too
                shutil.move(work / f"probe-{name}" / "profile.txt", out / f"probe_{name}_profile.txt")
                result[f"probe_{name}_profile"] = (out / f"probe_{name}_profile.txt").read_text().splitlines()[0]
            batch = json.loads((work / f"probe-{name}" / "config.json").read_text())["recipe"]["batch_size"]
            speed = steady_speed(rows)
            last = [r for r in rows if "img_per_s" in r][-1]
            probes[name] = {"img_per_s": speed, "flags": path_flags,
                            "overhead_s": round(seconds - args.probe_steps * batch / speed, 1),  # start-up, saving
                            "epoch_images": last["step"] / last["epoch"] * batch,
                            # The same seed and data for every probe: their losses differ only by the paths'
                            # rounding (and a GPU's nondeterministic kernels), a check that the paths agree.
                            "train_loss": last["train_loss"],
                            "val_top1": [r for r in rows if "val_top1" in r][-1]["val_top1"],
                            "warnings": [line for line in printed if "Capturing the training step" in line]}
            log(f"probe {name}: {speed:,.0f} img/s, {probes[name]['overhead_s']:.0f} s of start-up, training loss "
                f"{last['train_loss']:.4f} at step {last['step']}" + "".join(f"; {w}" for w in probes[name]["warnings"]))
            shutil.rmtree(work / f"probe-{name}")
        if not probes:
            raise SystemExit("Every probe failed; their output is above.")
        best = max(probes, key=lambda name: probes[name]["img_per_s"])
        speed, overhead = probes[best]["img_per_s"], probes[best]["overhead_s"]
        left = args.budget - (time.perf_counter() - START) - overhead - 30  # 30 s: ten validations, margin
        fit = max(1, int(left * speed / probes[best]["epoch_images"]))
        epochs = min(recipe_epochs, fit) if args.fit_budget else recipe_epochs
        if args.probes_only:
            result.update(probes=probes, path=best)
            (out / "cifar10_nano_probes.json").write_text(json.dumps(result, indent=1) + "\n")
            log(f"the {best} path is the fastest; probes only: no run")
            return
        log(f"the {best} path is the fastest; about {min(fit, recipe_epochs)} of the recipe's {recipe_epochs} epochs fit "
            f"in the budget; training {epochs}" + ("" if epochs <= fit else ", to be continued (--resume-from)"))
        result.update(probes=probes, path=best, epochs_fitting=fit)
        (out / "cifar10_nano_gpu.json").write_text(json.dumps(result, indent=1) + "\n")  # in case the run is cut
        flags = [*saves, *train_flags, *probes[best]["flags"], "--epochs", str(epochs)]

    first_step = sessions[-1]["saved_step"] if sessions else 0
    # Left for packing the state once the run is stopped: a few seconds; 15 for a slow disk.
    rows, seconds, _, stopped = train(args.data, run, args.workers, bf16, flags, resume=bool(sessions),
                                      seconds=args.budget - (time.perf_counter() - START) - 15)
    state = latest_state(run)
    saved_step = int(state.stem.split("-")[1]) if state else 0
    if not (run / "config.json").exists():  # stopped while it read the data
        raise SystemExit("The run was stopped before it started training; raise --budget.")
    total = json.loads((run / "config.json").read_text())["steps"]
    this_session = [r for r in rows if r["step"] > first_step]
    sessions.append({"date": result["date"], "device": device, "first_step": first_step, "saved_step": saved_step,
                     "stopped": stopped, "wall_s": round(seconds, 1),
                     "img_per_s_median": steady_speed(this_session) if this_session else None})
    val = [r for r in rows if "val_top1" in r]
    result.update(
        recipe_epochs=recipe_epochs, run_flags=flags, steps=total, sessions=sessions,
        holdout_top1=val[-1]["val_top1"] if val else None, holdout_n=val[-1]["val_n"] if val else None,
        holdout_curve=[(r["epoch"], round(r["val_top1"], 4)) for r in val],
        note="Hold-out: 2% of the 50,000 CIFAR-10 training images, not the test set. The target (>= 91% "
             "top-1) is on the CIFAR-10 test set: evaluate the finished run's cifar10_nano.safetensors there.",
    )
    speed = sessions[-1]["img_per_s_median"]
    log(f"this session: steps {first_step}-{sessions[-1]['saved_step'] if stopped else total} of {total} in "
        f"{seconds:.0f} s" + (f" at {speed:,.0f} img/s" if speed else "") +
        (f"; hold-out top-1 {result['holdout_top1']:.2%} (n={result['holdout_n']})" if val else ""))
    if stopped:
        if state is None:
            result["continue"] = "stopped before the first saved state: nothing to continue from"
        else:
            (run / RESUME_FILE).write_text(json.dumps(resume_record(flags, sessions, result), indent=1) + "\n")
            parts = pack_run(run, out)
            shutil.rmtree(work)  # all in the parts; a device run brings back 8 files at most
            result["continue"] = (f"stopped at the time limit; its state of step {saved_step} of {total} is in "
                                  f"{', '.join(p.name for p in parts)}: copy them into a folder DIR, carry it, and "
                                  f"run this script with --resume-from DIR")
        log(result["continue"])
    else:
        shutil.move(run / "model.safetensors", out / "cifar10_nano.safetensors")
        shutil.move(run / "curves.png", out / "cifar10_nano_gpu_curves.png")
    (out / "cifar10_nano_gpu.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
