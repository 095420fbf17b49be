"""The MLP-Mixer family (paper Table 1, SPEC §2) and the names users know it by."""

from __future__ import annotations

import dataclasses
import json
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Union

Size = Union[int, tuple[int, int]]

# Fields that change a layer's shape: a config that changes one is no longer the named variant.
SHAPE_FIELDS = frozenset({"num_blocks", "patch_size", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim"})


def as_pair(value: Size) -> tuple[int, int]:
    """`224` -> (224, 224); `(224, 320)` stays as it is; anything else is refused in one sentence."""
    def whole(v: Any) -> bool:  # numpy's integers too
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if whole(value):
        return (int(value), int(value))
    try:
        h, w = value
    except (TypeError, ValueError):
        h = w = None
    if not (whole(h) and whole(w)):
        raise ValueError(f"A size is a whole number or a (height, width) pair of them, not {value!r}.")
    return (int(h), int(w))


@dataclass(frozen=True)
class MixerConfig:
    """Everything that fixes a Mixer's shapes and its numerics.

    `patch_size` and `img_size` are (height, width) pairs; `num_tokens` = S follows from them.
    """

    patch_size: tuple[int, int] = (16, 16)
    hidden_dim: int = 768  # C
    num_blocks: int = 12  # N
    tokens_mlp_dim: int = 384  # D_S
    channels_mlp_dim: int = 3072  # D_C
    img_size: tuple[int, int] = (224, 224)
    in_chans: int = 3
    num_classes: int = 1000
    gelu: str = "tanh"  # "tanh" (official Flax nn.gelu) or "exact" (timm, PyTorch's nn.GELU())
    drop_rate: float = 0.0  # dropout before the head, as timm's drop_rate
    proj_drop_rate: float = 0.0  # dropout in the token- and channel-mixing MLPs, as timm's proj_drop_rate
    drop_path_rate: float = 0.0
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", as_pair(self.patch_size))
        object.__setattr__(self, "img_size", as_pair(self.img_size))
        if self.gelu not in ("tanh", "exact"):
            raise ValueError(f"gelu must be 'tanh' or 'exact', not {self.gelu!r}.")
        def whole(value: Any) -> bool:
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)

        for dim in ("hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim", "in_chans"):
            if not whole(getattr(self, dim)) or getattr(self, dim) < 1:
                raise ValueError(f"{dim} must be a whole number of at least 1, not {getattr(self, dim)!r}.")
        if not whole(self.num_classes) or self.num_classes < 0:
            raise ValueError(f"num_classes must be 0 (no head) or a larger whole number, not {self.num_classes!r}.")
        for rate in ("drop_rate", "proj_drop_rate", "drop_path_rate"):
            value = getattr(self, rate)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value <= 1:
                raise ValueError(f"{rate} must be a number from 0 to 1, not {value!r}.")
        (h, w), (ph, pw) = self.img_size, self.patch_size
        if ph < 1 or pw < 1:
            raise ValueError(f"patch_size must be at least 1×1, not {ph}×{pw}.")
        if h < ph or w < pw:
            raise ValueError(f"Image size {h}×{w} is smaller than the patch {ph}×{pw}; choose an image size "
                             "that is a positive multiple of the patch.")
        if h % ph or w % pw:
            raise ValueError(
                f"Image size {h}×{w} is not a multiple of the patch size {ph}×{pw}; "
                "choose an image size divisible by the patch."
            )

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, columns)."""
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def num_tokens(self) -> int:  # S
        gh, gw = self.grid
        return gh * gw

    def replace(self, **changes: Any) -> "MixerConfig":
        """A copy with `changes`; changing a layer shape drops the variant name unless one is given."""
        if SHAPE_FIELDS & set(changes) and "name" not in changes:
            changes["name"] = ""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"], d["img_size"] = list(self.patch_size), list(self.img_size)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MixerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown Mixer configuration fields: {sorted(unknown)}.")
        d = dict(d)
        if "proj_drop_rate" not in d:  # saved before it existed, when drop_rate was dropout in the MLPs too
            d["proj_drop_rate"] = d.get("drop_rate", 0.0)
        for key in ("patch_size", "img_size"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def describe(self) -> str:
        """Short human name: the paper's when the shapes are a paper variant."""
        if self.name:
            return f"Mixer-{self.name}"
        paper = paper_variant_of(self)
        if paper:
            return f"Mixer-{paper}"
        ph, pw = self.patch_size
        patch = f"{ph}" if ph == pw else f"{ph}x{pw}"
        return f"Mixer(C={self.hidden_dim}, N={self.num_blocks}, P={patch})"

    def num_params(self) -> int:
        """Exact parameter count, head included when num_classes > 0."""
        (ph, pw), c, s = self.patch_size, self.hidden_dim, self.num_tokens
        stem = self.in_chans * ph * pw * c + c
        block = 4 * c + (2 * s * self.tokens_mlp_dim + self.tokens_mlp_dim + s)
        block += 2 * c * self.channels_mlp_dim + self.channels_mlp_dim + c
        head = c * self.num_classes + self.num_classes
        return stem + self.num_blocks * block + 2 * c + head

    def macs(self) -> int:
        """Multiply-accumulates of one forward pass for one image (SPEC §2 formula)."""
        (ph, pw), c, s = self.patch_size, self.hidden_dim, self.num_tokens
        stem = s * self.in_chans * ph * pw * c
        blocks = self.num_blocks * (2 * c * s * self.tokens_mlp_dim + 2 * s * c * self.channels_mlp_dim)
        return stem + blocks + c * self.num_classes


# Paper Table 1: name -> (N, P, C, D_S, D_C).
PAPER_VARIANTS: dict[str, tuple[int, int, int, int, int]] = {
    "S/32": (8, 32, 512, 256, 2048),
    "S/16": (8, 16, 512, 256, 2048),
    "B/32": (12, 32, 768, 384, 3072),
    "B/16": (12, 16, 768, 384, 3072),
    "L/32": (24, 32, 1024, 512, 4096),
    "L/16": (24, 16, 1024, 512, 4096),
    "H/14": (32, 14, 1280, 640, 5120),
}

# Small models for small images: not in the paper, used by recipes and tests.
EXTRA_VARIANTS: dict[str, tuple[int, int, int, int, int]] = {
    # SPEC §3's "Mixer-nano" for 32×32 CIFAR-10.
    "nano/4": (8, 4, 128, 64, 512),
    # The default job's model (recipe mnist5k) for 28×28 digits: 16 tokens, narrow channels.
    "digits/7": (4, 7, 48, 24, 192),
    # A small model for 28×28 digits with 49 tokens (tests, examples).
    "digits/4": (4, 4, 128, 64, 256),
}

# The image side each variant is built for when none is given: the paper's 224, or the small images an
# extra variant was made for (its token MLP's S depends on it: nano/4 at 224 would mix 3,136 tokens).
DEFAULT_IMG_SIZE: dict[str, int] = {name: 224 for name in PAPER_VARIANTS}
DEFAULT_IMG_SIZE.update({"nano/4": 32, "digits/7": 28, "digits/4": 28})

# timm's former names, which it still builds (with a deprecation warning), and their names since.
TIMM_RENAMED: dict[str, str] = {
    "mixer_b16_224_in21k": "mixer_b16_224.goog_in21k_ft_in1k",
    "mixer_l16_224_in21k": "mixer_l16_224.goog_in21k_ft_in1k",
    "mixer_b16_224_miil": "mixer_b16_224.miil_in21k_ft_in1k",
    "mixer_b16_224_miil_in21k": "mixer_b16_224.miil_in21k",
}

_NAME = re.compile(r"^(?:mixer[-_ ]?)?([a-z]+)[/_-]?(\d+)(?:[_-](\d+))?$", re.IGNORECASE)


def canonical_name(name: str) -> str:
    """Map 'B/16', 'Mixer-B/16', 'Mixer-B_16', 'mixer_b16_224', 'b16' to 'B/16'.

    Raises ValueError listing the known variants for anything else.
    """
    m = _NAME.match(name.strip())
    if m:
        family, patch = m.group(1), m.group(2)
        for known in (*PAPER_VARIANTS, *EXTRA_VARIANTS):
            kf, kp = known.split("/")
            if kf.lower() == family.lower() and kp == patch:
                return known
    known_names = ", ".join([*PAPER_VARIANTS, *EXTRA_VARIANTS])
    raise ValueError(
        f"Unknown Mixer variant {name!r}; known variants are {known_names} "
        "(also written 'Mixer-B/16', 'Mixer-B_16' or 'mixer_b16_224')."
    )


def name_img_size(name: str) -> int | None:
    """The resolution a timm-style name carries ('mixer_b16_448' -> 448), else None."""
    m = _NAME.match(name.strip())
    return int(m.group(3)) if m and m.group(3) else None


def variant_config(name: str, **overrides: Any) -> MixerConfig:
    """The configuration of a named variant, with any field overridden."""
    key = canonical_name(name)
    n, p, c, ds, dc = {**PAPER_VARIANTS, **EXTRA_VARIANTS}[key]
    size = name_img_size(name) or DEFAULT_IMG_SIZE[key]
    base = MixerConfig(num_blocks=n, patch_size=p, hidden_dim=c, tokens_mlp_dim=ds, channels_mlp_dim=dc,
                       img_size=size, name=key)
    return base.replace(**overrides)


def paper_variant_of(config: MixerConfig) -> str | None:
    """The Table-1 name whose layer shapes `config` has (at any resolution), or None."""
    ph, pw = config.patch_size
    for key, (n, p, c, ds, dc) in {**PAPER_VARIANTS, **EXTRA_VARIANTS}.items():
        if (n, p, p, c, ds, dc) == (
            config.num_blocks, ph, pw, config.hidden_dim, config.tokens_mlp_dim, config.channels_mlp_dim
        ):
            return key
    return None


def timm_name(config: MixerConfig) -> str | None:
    """timm's name of the model with `config`'s layer shapes (timm has S, B and L with patches 16 and 32), or None."""
    variant = paper_variant_of(config)
    if variant is None or variant.split("/")[0] not in ("S", "B", "L"):
        return None
    family, patch = variant.split("/")
    return f"mixer_{family.lower()}{patch}_224"
