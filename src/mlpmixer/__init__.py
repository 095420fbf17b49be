"""MLP-Mixer image classifiers: every paper variant, exact official and timm weights, and tools."""

from .checkpoints import CheckpointError, convert, load_checkpoint, save_checkpoint
from .model import MlpMixer, create_model
from .pretrained import available, load_pretrained, register_weights
from .resize import resize_to
from .variants import PAPER_VARIANTS, MixerConfig, variant_config

__all__ = [
    "CheckpointError",
    "MixerConfig",
    "MlpMixer",
    "PAPER_VARIANTS",
    "available",
    "convert",
    "create_model",
    "load_checkpoint",
    "load_pretrained",
    "register_weights",
    "resize_to",
    "save_checkpoint",
    "variant_config",
]
__version__ = "0.1.0"
