"""A short CPU run of the `cifar10-nano` recipe (SPEC §3's Mixer-nano, patch 4 at 32×32) on the shared
CIFAR-10 shards: throughput and the hold-out accuracy after a few steps.

The recipe's target (>= 91% top-1 on the CIFAR-10 test set after its epochs) needs a GPU and is NOT
measured here: this records only that the recipe runs end to end on the CPU, how fast, and where a short
run gets to. Runs the real command (`mixer train --recipe cifar10-nano --steps N`) and reads the run's
metrics.jsonl; writes benchmarks/results/cifar10_nano_cpu.json. On a machine shared with other jobs the
images/s are pessimistic.

    python benchmarks/cifar10_nano_short.py [--steps 100] [--out runs/bench-cifar10-nano]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"
RESULTS = ROOT / "benchmarks" / "results" / "cifar10_nano_cpu.json"


def mixer() -> list[str]:
    """The installed console script next to this Python, else `python -m mlpmixer` (the same code)."""
    script = Path(sys.executable).with_name("mixer")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlpmixer"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100, help="optimiser steps of the recipe's batch")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-cifar10-nano"), help="run directory")
    p.add_argument("--machine", default="2-core CPU, shared with other jobs", help="recorded with the result")
    p.add_argument("--no-write", action="store_true", help="do not update the results file")
    args = p.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    # One validation pass, at the end: the recipe's 10 would fall inside the logged intervals and slow
    # the images/s they report.
    config = Path(tempfile.mkdtemp()) / "evals.json"
    config.write_text(json.dumps({"evals": 1}))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run([*mixer(), "train", "--recipe", "cifar10-nano", "--data", str(CIFAR10), "--steps", str(args.steps),
                    "--config", str(config), "--out", args.out, "--quiet"], check=True)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (Path(args.out) / "metrics.jsonl").read_text().splitlines() if line]
    speeds = [r["img_per_s"] for r in rows if "img_per_s" in r]
    val = [r for r in rows if "val_top1" in r][-1]
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": args.machine,
        "load_average_before": round(load_before, 2),
        "command": f"mixer train --recipe cifar10-nano --data {CIFAR10.name} --steps {args.steps} "
                   "--config EVALS.json (one validation, at the end)",
        "steps": args.steps,
        "batch_size": json.loads((Path(args.out) / "config.json").read_text())["recipe"]["batch_size"],
        # Training only, batch augmentation on the device (here the CPU) included; the images were decoded
        # into memory before. The first logged interval holds the warm-up: the median is the steady speed.
        "augment_on": json.loads((Path(args.out) / "config.json").read_text())["recipe"]["augment_on"],
        "images_per_s_median": sorted(speeds)[len(speeds) // 2],
        "wall_s": round(seconds, 1),
        "holdout_top1": val["val_top1"],
        "holdout_n": val["val_n"],
        "note": "Hold-out (2% of the 50,000 training images), not the CIFAR-10 test set. The recipe's target of "
                ">= 91% top-1 on the test set after the recipe's epochs needs a GPU and was not measured.",
    }
    print(json.dumps(result, indent=1))
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
