"""One module per `mixer` subcommand; see `mlpmixer.cli`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..recipes import MAX_SEED, PERMUTE_MODES

if TYPE_CHECKING:
    import torch

    from ..permute import FixedPermutation
    from ..variants import MixerConfig


def at_least(low: int, most: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `low` (and at most `most`); anything else is argparse's
    one-line error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most}, not {value}")
        return value

    return parse


def image_size(values: list[int]) -> int | tuple[int, int]:
    """An `--img-size N [N]` option's value: N for a square image, (H, W) for two numbers."""
    if len(values) > 2:
        raise ValueError(f"--img-size takes N or H W, not {len(values)} numbers.")
    return (values[0], values[1]) if len(values) == 2 else values[0]


def check_out_file(out: str | Path, option: str = "--out") -> None:
    """A file `option` names must be writable: a folder there, a path under a file, or a folder where no file can be
    created (read-only, /proc) is one sentence before the work, not an errno naming a temporary file after it."""
    from ..checkpoints import check_writable_folder  # torch: only when a command runs

    path = Path(out)
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a folder; give the name of a file to write.")
    check_writable_folder(path.parent if path.exists() else path, option)


def run_recipe(checkpoint: str) -> dict[str, Any]:
    """The recipe a `mixer train` run recorded in the config.json beside `checkpoint` (a run directory,
    a checkpoint file in one, or a training state in its checkpoints/ folder); {} where there is none. An
    unreadable config.json is an error, not {}: it may hold the permutation the run's images need, and going
    on without it would be silently wrong."""
    path = Path(checkpoint)
    folder = path if path.is_dir() else path.parent
    if folder.name == "checkpoints" and not (folder / "config.json").exists():  # RUN/checkpoints/step-N.pt
        folder = folder.parent
    config = folder / "config.json"
    if not config.is_file():
        return {}
    try:
        saved = json.loads(config.read_text())
        if not isinstance(saved, dict) or "recipe" not in saved:  # another tool's config.json (timm's, say)
            return {}
        if not isinstance(saved["recipe"], dict):
            raise ValueError("its \"recipe\" is not a JSON object")
    except (OSError, ValueError) as e:
        raise ValueError(f"{config} cannot be read ({e}); it records how the run prepares its images (permutation, "
                         "evaluation mode): restore it, or use a copy of the model file kept outside the run folder."
                         ) from None
    return saved["recipe"]


def run_eval_mode(checkpoint: Optional[str], asked: Optional[str]) -> str:
    """The evaluation preprocessing (SPEC §4) for a checkpoint's images: `asked`, else the one its run
    validated with, else "resize" (published weights and files without a run: the paper's default)."""
    return asked or (run_recipe(checkpoint).get("eval_mode") if checkpoint else None) or "resize"


def run_permutation(checkpoint: str, config: MixerConfig, mode: Optional[str] = None,
                    seed: Optional[int] = None) -> Optional[FixedPermutation]:
    """The fixed pixel permutation (paper Figure 4) a run was trained with, or the one `mode` ("none":
    no permutation) and `seed` ask for; None where there is none. Every command that feeds a run's
    model images must apply it, or it measures a model on images it never saw."""
    from ..permute import FixedPermutation  # torch: only when a command runs

    recipe = run_recipe(checkpoint)
    if recipe.get("permute") not in (None, *PERMUTE_MODES) or not isinstance(recipe.get("permute_seed") or 0, int):
        raise ValueError(f"The run configuration beside {checkpoint} records no valid permutation (permute "
                         f"{recipe.get('permute')!r}, seed {recipe.get('permute_seed')!r}); restore its config.json.")
    if seed is not None and not (mode or recipe.get("permute")):  # a seed alone would be ignored without a word
        raise ValueError(f"--permute-seed needs --permute: no permutation is recorded beside {checkpoint}.")
    if seed is not None and not 0 <= seed <= MAX_SEED:  # the range mixer train takes: no run has another seed
        raise ValueError(f"--permute-seed must be a whole number from 0 to {MAX_SEED:,}, as mixer train takes it.")
    mode = mode or recipe.get("permute")
    seed = (recipe.get("permute_seed") or 0) if seed is None else seed
    if not mode or mode == "none":
        return None
    return FixedPermutation(mode, config.img_size, config.patch_size, seed)


def add_permute_arguments(p: argparse.ArgumentParser) -> None:
    """--permute and --permute-seed, for the commands that take `run_permutation`'s arguments."""
    p.add_argument("--permute", choices=[*PERMUTE_MODES, "none"],
                   help="apply the fixed permutation a run was trained with (paper Figure 4); default: the "
                   "one recorded in the run directory's config.json, if any")
    p.add_argument("--permute-seed", type=int, help="seed of that permutation, 0 to 2**63 - 1 (default: the run's, "
                   "or 0)")


def warn_empty_classes(eval_labels: torch.Tensor, names: list[str], where: str) -> None:
    """Warn, as opening an image folder does of an empty class folder, of each class that the evaluation
    images (`where`: their source) hold none of: its accuracy would be NaN, and the totals leave it out."""
    from ..fewshot import class_label
    from ..sources import warn_nothing_to_evaluate

    for c in (eval_labels.bincount(minlength=len(names)) == 0).nonzero().flatten().tolist():
        warn_nothing_to_evaluate(f"The evaluation part of {class_label(c, names)} ({where})")
