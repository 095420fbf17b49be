"""Does the data pipeline keep up? (issue 3, "Targets").

Reads the Imagenette WebDataset shards (224×224 JPEG) with `mlpmixer.sources` and the ImageNet
training augmentation of `mlpmixer.transforms` (Inception crop, area 0.05-1, to 224; random flip;
RandAugment(2, 15); pixels to [-1, 1]) and measures

1. decoded and augmented images per second through a DataLoader with 0 (main process), 1 and 2
   workers; the main process is limited to 1 intra-op thread like a worker, so the numbers are per
   worker;
2. the CPU training throughput of Mixer-S/16 (10 classes, Adam, batch 16) on one fixed batch, and
   fed by the pipeline, so the difference is what the data costs the training loop;
3. augmentation alone on images already decoded into memory, on one thread: image by image (what a
   worker does after decoding) against whole batches (`--augment-on device`, `batch_augment.py`), for
   Imagenette at 224 and, with the `cifar10-nano` recipe's settings, CIFAR-10 at 32.

    .venv/bin/python benchmarks/data_pipeline.py [--images 384] [--steps 2] [--out benchmarks/results/data_pipeline.json]

Prints a table and writes JSON (machine, date, versions, results). About 2-3 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from mlpmixer import create_model  # noqa: E402
from mlpmixer.bench import cpu_name  # noqa: E402
from mlpmixer.checkpoints import atomic_write  # noqa: E402
from mlpmixer.recipes import get_recipe  # noqa: E402
from mlpmixer.sources import open_folder_or_shards  # noqa: E402
from mlpmixer.transforms import train_transform  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "imagenette"
CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"
NANO = get_recipe("cifar10-nano")
# (data, output size, crop area, pad crop, RandAugment magnitude, batch): Imagenette as above, CIFAR-10 as
# the cifar10-nano recipe augments it now.
AUGMENT_CASES = {
    "imagenette-224": (DATA, 224, (0.05, 1.0), 0, 15, 32),
    "cifar10-32": (CIFAR10, NANO.img_size, tuple(NANO.crop_area), NANO.pad_crop, NANO.randaugment, NANO.batch_size),
}
AUGMENTATION = "RandomResizedCrop(224, area 0.05-1) + horizontal flip + RandAugment(2, 15), pixels to [-1, 1]"


def loader(workers: int, batch_size: int) -> DataLoader:
    source = open_folder_or_shards(str(DATA), "train", 0.0, 0, train_transform(224, 3, randaugment_m=15))
    return DataLoader(source.dataset, batch_size=batch_size, num_workers=workers)


def pipeline_rate(workers: int, images: int, batch_size: int = 32) -> float:
    """Images/s after the first batch (which pays for starting the workers and filling buffers)."""
    batches = iter(loader(workers, batch_size))
    next(batches)
    start, seen = time.perf_counter(), 0
    while seen < images:
        seen += len(next(batches)[1])
    return seen / (time.perf_counter() - start)


def training_rate(steps: int, batch_size: int, workers: int | None) -> float:
    """Images/s of Mixer-S/16 training steps after one warm-up step; workers=None: one fixed batch."""
    torch.manual_seed(0)
    model = create_model("S/16", num_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if workers is None:
        fixed = (torch.randn(batch_size, 3, 224, 224), torch.randint(0, 10, (batch_size,)))
        batches: Any = iter(lambda: fixed, None)
    else:
        batches = iter(loader(workers, batch_size))
    start = 0.0
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        images, labels = next(batches)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch_size / (time.perf_counter() - start)


def augment_rates(data: Path, size: int, area: tuple[float, float], pad: int, m: int, batch: int) -> tuple[float, float]:
    """(image by image, whole batches) augmented images/s on one thread, on `batch` decoded images."""
    from mlpmixer.batch_augment import BatchAugment

    samples = open_folder_or_shards(str(data), "val", 0.0, 0, None).dataset
    images = torch.stack([image for image, _ in itertools.islice(samples, batch)])
    one_by_one = train_transform(size, 3, crop_area=area, randaugment_m=m, pad_crop=pad)
    batched = BatchAugment(size, area, True, m, pad=pad)
    generator = torch.Generator().manual_seed(0)
    batched(images, generator)  # warm-up
    rates = []
    for augment in (lambda: [one_by_one(image) for image in images], lambda: batched(images, generator)):
        start, n = time.perf_counter(), 0
        while n == 0 or time.perf_counter() - start < 3:
            augment()
            n += len(images)
        rates.append(n / (time.perf_counter() - start))
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=384, help="images timed per worker setting")
    parser.add_argument("--steps", type=int, default=2, help="training steps timed (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch")
    parser.add_argument("--train-workers", type=int, default=1, help="DataLoader workers feeding training")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_pipeline.json"))
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"The Imagenette shards are not at {DATA}.")

    load_before = os.getloadavg()
    threads = torch.get_num_threads()
    pipeline = {}
    for workers in (0, 1, 2):
        torch.set_num_threads(1 if workers == 0 else threads)  # workers run with 1 thread each
        pipeline[workers] = pipeline_rate(workers, args.images)
        print(f"pipeline, {workers} workers: {pipeline[workers]:.0f} images/s", flush=True)
    augment = {}
    torch.set_num_threads(1)
    for name, case in AUGMENT_CASES.items():
        augment[name] = augment_rates(*case)
        print(f"augmentation alone, {name}: {augment[name][0]:.0f} images/s image by image, "
              f"{augment[name][1]:.0f} in batches of {case[5]}", flush=True)
    torch.set_num_threads(threads)
    model_only = training_rate(args.steps, args.batch_size, None)
    print(f"S/16 training on a fixed batch: {model_only:.2f} images/s", flush=True)
    fed = training_rate(args.steps, args.batch_size, args.train_workers)
    print(f"S/16 training fed by the pipeline: {fed:.2f} images/s", flush=True)
    load_after = os.getloadavg()

    print()
    print("| measurement | images/s |")
    print("|---|---|")
    for workers, rate in pipeline.items():
        where = "main process" if workers == 0 else f"{workers} worker{'s' * (workers > 1)}"
        print(f"| decode + augment, {where} | {rate:.0f} |")
    print(f"| Mixer-S/16 training, batch {args.batch_size}, fixed batch | {model_only:.2f} |")
    print(f"| Mixer-S/16 training, batch {args.batch_size}, fed by {args.train_workers} worker(s) | {fed:.2f} |")
    for name, (single, batched) in augment.items():
        print(f"| augmentation alone, {name}, one thread: image by image / whole batches | {single:.0f} / {batched:.0f} |")
    shared = load_before[0] > 1.5
    print(f"\nThe pipeline delivers {pipeline[1] / model_only:.0f}× what S/16 training consumes on this CPU. "
          f"Load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
          + (": the machine was shared, so the numbers are pessimistic." if shared else "."))

    result = {
        "benchmark": "data pipeline on the Imagenette shards (issue 3)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": threads,
            "load_average_before": round(load_before[0], 2),
            "load_average_after": round(load_after[0], 2),
            "note": "shared with other jobs while measuring: numbers are pessimistic" if shared else "quiet machine",
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
        },
        "data": str(DATA.relative_to(ROOT.parent)),
        "augmentation": AUGMENTATION,
        "pipeline_images_per_s": {f"{w}_workers": round(r, 1) for w, r in pipeline.items()},
        "pipeline_note": "0 workers = the main process with 1 intra-op thread; workers have 1 thread each",
        "augmentation_alone_images_per_s": {
            name: {"image_by_image": round(single, 1), "whole_batches": round(batched, 1), "batch": AUGMENT_CASES[name][5],
                   "crop_area": list(AUGMENT_CASES[name][2]), "pad_crop": AUGMENT_CASES[name][3],
                   "randaugment_m": AUGMENT_CASES[name][4]}
            for name, (single, batched) in augment.items()},
        "augmentation_note": "one thread, images already decoded: the per-image transforms of a DataLoader worker "
                             "against batch_augment.BatchAugment (--augment-on device) run on the CPU",
        "training": {
            "model": "Mixer-S/16, 10 classes, 224x224, Adam, CPU float32",
            "batch_size": args.batch_size,
            "steps_timed": args.steps,
            "fixed_batch_images_per_s": round(model_only, 3),
            "fed_images_per_s": round(fed, 3),
            "fed_workers": args.train_workers,
        },
    }
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
