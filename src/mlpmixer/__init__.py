"""MLP-Mixer image classifiers: every paper variant, exact official and timm weights, and tools.

The names below are imported on first use (PEP 562): importing the package, as `mixer` does for every
command, then costs nothing until a name that needs torch is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "CheckpointError": "checkpoints",
    "convert": "checkpoints",
    "load_checkpoint": "checkpoints",
    "save_checkpoint": "checkpoints",
    "MlpMixer": "model",
    "create_model": "model",
    "available": "pretrained",
    "load_pretrained": "pretrained",
    "register_weights": "pretrained",
    "resize_to": "resize",
    "PAPER_VARIANTS": "variants",
    "MixerConfig": "variants",
    "variant_config": "variants",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"

if TYPE_CHECKING:  # what type checkers and editors see
    from .checkpoints import CheckpointError, convert, load_checkpoint, save_checkpoint
    from .model import MlpMixer, create_model
    from .pretrained import available, load_pretrained, register_weights
    from .resize import resize_to
    from .variants import PAPER_VARIANTS, MixerConfig, variant_config


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        try:  # a submodule, as after `import mlpmixer.fast`: `mlpmixer.fast.optimize(model)`
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":  # the submodule exists and lacks something itself
                raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later uses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
