"""Reading and writing Mixer weights: the official .npz layout, timm state dicts, and our own
.safetensors format, which carries the whole configuration so that a file alone rebuilds its model.

The format follows the file's extension (SPEC §6 gives both foreign layouts):

| extension                | layout                                             | GELU when loaded |
|--------------------------|----------------------------------------------------|------------------|
| .npz                     | official Flax (`MixerBlock_0/token_mixing/...`)     | tanh             |
| .pth .pt .bin            | timm state dict (`blocks.0.mlp_tokens.fc1.weight`) | exact            |
| .safetensors             | ours (config in metadata), or timm's if it has none | as saved / exact |
| a run directory          | the final `model.safetensors` that `mixer train` wrote |              |

Nothing is ever unpickled: `numpy.load(allow_pickle=False)`, `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .model import MlpMixer
from .variants import MixerConfig

RUN_MODEL_FILE = "model.safetensors"
TORCH_EXTENSIONS = (".pth", ".pt", ".bin")
EXTENSIONS = (".npz", ".safetensors", *TORCH_EXTENSIONS)
FORMAT_TAG = "mlpmixer"

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit: the message says what to do."""


# ---------------------------------------------------------------------------------------------
# The official layout <-> ours (= timm's names).


def _official_pairs(num_blocks: int) -> Iterator[tuple[str, str, str]]:
    """(official key, our key, kind) for every tensor but the stem kernel."""
    yield "stem/bias", "stem.proj.bias", "vector"
    for i in range(num_blocks):
        o, t = f"MixerBlock_{i}", f"blocks.{i}"
        for n in (0, 1):
            for leaf, ours in (("scale", "weight"), ("bias", "bias")):
                yield f"{o}/LayerNorm_{n}/{leaf}", f"{t}.norm{n + 1}.{ours}", "vector"
        for mlp, ours in (("token_mixing", "mlp_tokens"), ("channel_mixing", "mlp_channels")):
            for n in (0, 1):
                yield f"{o}/{mlp}/Dense_{n}/kernel", f"{t}.{ours}.fc{n + 1}.weight", "dense"
                yield f"{o}/{mlp}/Dense_{n}/bias", f"{t}.{ours}.fc{n + 1}.bias", "vector"
    yield "pre_head_layer_norm/scale", "norm.weight", "vector"
    yield "pre_head_layer_norm/bias", "norm.bias", "vector"


def _count_blocks(keys: Any, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def official_to_state(arrays: dict[str, np.ndarray]) -> StateDict:
    """Official Flax arrays -> our state dict. Dense kernels (in, out) become (out, in)."""
    arrays = {k.removeprefix("params/"): v for k, v in arrays.items()}
    num_blocks = _count_blocks(arrays, r"MixerBlock_(\d+)/")
    state: StateDict = {}
    used = set()
    if "stem/kernel" in arrays:  # (P, P, in, C) -> (C, in, P, P)
        state["stem.proj.weight"] = torch.from_numpy(np.ascontiguousarray(arrays["stem/kernel"].transpose(3, 2, 0, 1)))
        used.add("stem/kernel")
    pairs = list(_official_pairs(num_blocks))
    if "head/kernel" in arrays or "head/bias" in arrays:
        pairs += [("head/kernel", "head.weight", "dense"), ("head/bias", "head.bias", "vector")]
    for official, ours, kind in pairs:
        if official in arrays:
            a = arrays[official]
            state[ours] = torch.from_numpy(np.ascontiguousarray(a.T if kind == "dense" else a))
            used.add(official)
    unexpected = sorted(set(arrays) - used)
    if unexpected:
        raise CheckpointError(
            f"The .npz file has keys that are not in the official Mixer layout ({_short(unexpected)}); "
            "it is not an MLP-Mixer checkpoint."
        )
    return state


def state_to_official(state: StateDict) -> dict[str, np.ndarray]:
    """Our state dict -> official Flax arrays (float32, Dense kernels (in, out))."""
    num_blocks = _count_blocks(state, r"blocks\.(\d+)\.")
    arrays = {"stem/kernel": state["stem.proj.weight"].permute(2, 3, 1, 0)}
    pairs = list(_official_pairs(num_blocks))
    if "head.weight" in state:
        pairs += [("head/kernel", "head.weight", "dense"), ("head/bias", "head.bias", "vector")]
    for official, ours, kind in pairs:
        arrays[official] = state[ours].T if kind == "dense" else state[ours]
    return {k: v.detach().cpu().float().contiguous().numpy() for k, v in arrays.items()}


# ---------------------------------------------------------------------------------------------
# The configuration a state dict implies.


def infer_config(state: StateDict, gelu: str, img_size: Any = None) -> MixerConfig:
    """Shapes -> MixerConfig: P, in_chans and C from the stem, S and D_S from token mixing, D_C from
    channel mixing, N from the block count, classes from the head. The image size follows from S
    when the patch grid is square; otherwise it must be given."""
    try:
        c, in_chans, ph, pw = state["stem.proj.weight"].shape
        d_s, s = state["blocks.0.mlp_tokens.fc1.weight"].shape
        d_c = state["blocks.0.mlp_channels.fc1.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            f"The checkpoint lacks the stem or first block of a Mixer ({e}); it is not an MLP-Mixer checkpoint."
        ) from None
    if img_size is None:
        side = math.isqrt(s)
        if side * side != s:
            raise CheckpointError(
                f"The checkpoint's {s} tokens do not form a square patch grid, so its image size is "
                "unknown; pass img_size=(height, width)."
            )
        img_size = (side * ph, side * pw)
    head = state.get("head.weight")
    return MixerConfig(
        patch_size=(ph, pw),
        hidden_dim=c,
        num_blocks=_count_blocks(state, r"blocks\.(\d+)\."),
        tokens_mlp_dim=d_s,
        channels_mlp_dim=d_c,
        img_size=img_size,
        in_chans=in_chans,
        num_classes=0 if head is None else head.shape[0],
        gelu=gelu,
    )


# ---------------------------------------------------------------------------------------------
# Reading files.


def _short(items: list[str], limit: int = 6) -> str:
    more = f", … ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _read_npz(path: Path) -> StateDict:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise CheckpointError(
                f"{path} holds Python objects (object arrays), which are never unpickled; "
                "save the weights as plain numeric arrays."
            ) from None
        raise CheckpointError(f"{path} is not a readable .npz file ({e}); re-download or re-save it.") from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
        raise CheckpointError(
            f"{path} is not a readable .npz file (truncated or corrupt: {e}); re-download or re-save it."
        ) from None
    bad = [k for k, v in arrays.items() if not np.issubdtype(v.dtype, np.floating)]
    if bad:
        raise CheckpointError(f"{path} has non-float arrays ({_short(bad)}); it is not a Mixer checkpoint.")
    return official_to_state(arrays)


def _read_torch(path: Path) -> StateDict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} contains Python objects other than tensors and was not loaded (it is never unpickled); "
            "save a plain state dict of tensors, or use .safetensors."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{path} is not a readable PyTorch file (truncated or corrupt: {str(e).splitlines()[0]}); "
            "re-download or re-save it."
        ) from None
    # Training checkpoints often nest the weights.
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors; save model.state_dict().")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable .safetensors file (truncated or corrupt: {e}); re-download or re-save it."
        ) from None
    return state, metadata


def resolve_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the final model inside a run directory."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / RUN_MODEL_FILE).is_file():
            return p / RUN_MODEL_FILE
        raise CheckpointError(
            f"{p} is a directory without {RUN_MODEL_FILE}: not a finished `mixer train` run; "
            "pass a checkpoint file or a run directory whose training completed."
        )
    if not p.exists():
        raise CheckpointError(f"No checkpoint at {p}; check the path.")
    if p.suffix.lower() not in EXTENSIONS:
        raise CheckpointError(
            f"{p} has an unknown checkpoint extension {p.suffix!r}; use one of {', '.join(EXTENSIONS)}."
        )
    return p


def read_checkpoint(path: str | os.PathLike, **overrides: Any) -> tuple[StateDict, MixerConfig, dict[str, Any]]:
    """Read a checkpoint into (state dict in our names, its configuration, extra metadata).

    `overrides` change configuration fields (gelu, img_size, drop_path_rate, ...) before building.
    Extra metadata holds `class_names` where the file carries them.
    """
    p = resolve_path(path)
    suffix = p.suffix.lower()
    extra: dict[str, Any] = {}
    img_size = overrides.get("img_size")
    if suffix == ".npz":
        state = _read_npz(p)
        config = infer_config(state, gelu="tanh", img_size=img_size)
    elif suffix in TORCH_EXTENSIONS:
        state = _read_torch(p)
        config = infer_config(state, gelu="exact", img_size=img_size)
    else:
        state, metadata = _read_safetensors(p)
        if metadata.get("format") == FORMAT_TAG:
            config = MixerConfig.from_dict(json.loads(metadata["config"]))
            if "class_names" in metadata:
                extra["class_names"] = json.loads(metadata["class_names"])
        else:
            config = infer_config(state, gelu="exact", img_size=img_size)
    try:
        config = config.replace(**overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"Cannot apply {overrides} to the checkpoint's configuration: {e}") from None
    return state, config, extra


def _compare(state: StateDict, expected: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    return missing, unexpected, misshaped


def load_checkpoint(path: str | os.PathLike, model: MlpMixer | None = None, **overrides: Any) -> MlpMixer:
    """Build a model from a checkpoint file or run directory, or load it into `model`.

    Without `model`, the configuration comes from the file (ours) or its shapes (.npz, timm), with
    `overrides` applied. A `num_classes` override that differs from the file's drops its head and
    puts a new zero-initialised one (for fine-tuning). With `model`, the file must match it exactly.
    """
    state, config, extra = read_checkpoint(path, **overrides)
    if model is None:
        if "num_classes" in overrides and overrides["num_classes"] != _head_classes(state):
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            model = MlpMixer(config)
            _load_state(model, state, path, config, ignore_missing_head=True)
        else:
            model = MlpMixer(config)
            _load_state(model, state, path, config)
    else:
        _load_state(model, state, path, config)
    model.class_names = extra.get("class_names")
    return model


def _head_classes(state: StateDict) -> int:
    head = state.get("head.weight")
    return 0 if head is None else head.shape[0]


def _load_state(
    model: MlpMixer, state: StateDict, path: Any, config: MixerConfig, ignore_missing_head: bool = False
) -> None:
    expected = model.state_dict()
    missing, unexpected, misshaped = _compare(state, expected)
    if ignore_missing_head:
        missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected or misshaped:
        parts = [f"missing keys: {_short(missing)}" if missing else "",
                 f"unexpected keys: {_short(unexpected)}" if unexpected else "",
                 f"mis-shaped: {_short(misshaped, 3)}" if misshaped else ""]
        detail = "; ".join(p for p in parts if p)
        raise CheckpointError(
            f"{path} holds a {config.describe()} with {config.num_classes} classes at "
            f"{config.img_size[0]}×{config.img_size[1]}, which does not fit the "
            f"{model.config.describe()} with {model.config.num_classes} classes at "
            f"{model.config.img_size[0]}×{model.config.img_size[1]} ({detail}); build the model from the "
            "file instead (mlpmixer.load_checkpoint(path)) or pick the matching checkpoint."
        )
    ref = next(iter(expected.values()))
    model.load_state_dict({k: v.to(device=ref.device, dtype=expected[k].dtype) for k, v in state.items()},
                          strict=not ignore_missing_head)


# ---------------------------------------------------------------------------------------------
# Writing files.


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Call `write(tmp_path)` then move the finished file into place: a crash leaves the old file.

    The temporary file is fsynced before the rename, and the directory after it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def save_checkpoint(model: MlpMixer, path: str | os.PathLike, class_names: list[str] | None = None) -> Path:
    """Write `model` in the format its extension names (see the module docstring), atomically.

    Our .safetensors keeps the configuration and class names; .npz is the official layout;
    .pth/.pt/.bin a timm-compatible state dict (which timm and `load_checkpoint` read with exact GELU).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    names = class_names if class_names is not None else getattr(model, "class_names", None)
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {"format": FORMAT_TAG, "config": model.config.to_json()}
        if names:
            metadata["class_names"] = json.dumps(list(names))
        return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    if suffix == ".npz":
        arrays = state_to_official(state)
        return atomic_write(path, lambda tmp: _savez(tmp, arrays))
    if suffix in TORCH_EXTENSIONS:
        return atomic_write(path, lambda tmp: torch.save(state, tmp))
    raise CheckpointError(f"Cannot write {path}: unknown extension {path.suffix!r}; use one of {', '.join(EXTENSIONS)}.")


def _savez(tmp: str, arrays: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to the name
        np.savez(f, **arrays)


def convert(src: str | os.PathLike, dst: str | os.PathLike, **overrides: Any) -> MlpMixer:
    """Read any supported checkpoint and write it in the format of `dst`'s extension."""
    model = load_checkpoint(src, **overrides)
    save_checkpoint(model, dst)
    return model
