"""One module per `mixer` subcommand; see `mlpmixer.cli`."""

from __future__ import annotations

import argparse
from typing import Callable, Optional


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
