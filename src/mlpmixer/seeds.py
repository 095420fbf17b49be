"""Seeds derived from the run's seed: every random draw of training follows from where it is made
(the order of an epoch, the augmentation of an image, the dropout of a step), not from how many draws
came before it, so a resumed run makes the same draws as an uninterrupted one."""

from __future__ import annotations

import torch

from .recipes import MAX_SEED


def derive_seed(seed: int, *parts: int) -> int:
    """A distinct 63-bit seed for each (seed, *parts), e.g. (seed, kind, epoch) or (seed, kind, step)."""
    h = seed
    for p in parts:
        h = (h * 6364136223846793005 + p + 1442695040888963407) % (MAX_SEED + 1)
    return h


def reseed(seed: int) -> None:
    """torch.manual_seed, without its cost where CUDA is built in but absent: there each call also
    queues a deferred CUDA, XPU and MTIA seeding with a captured stack trace (2 ms, 6% of a step of
    the default job, and a queue that grows every step)."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
