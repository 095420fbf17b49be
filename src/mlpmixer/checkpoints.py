"""Reading and writing Mixer weights: the official .npz layout, timm state dicts, and our own
.safetensors format, which carries the whole configuration so that a file alone rebuilds its model.

The format follows the file's extension (SPEC §6 gives both foreign layouts):

| extension       | layout                                                  | GELU when loaded |
|-----------------|---------------------------------------------------------|------------------|
| .npz            | official Flax (`MixerBlock_0/token_mixing/...`)         | tanh             |
| .pth .pt .bin   | timm state dict (`blocks.0.mlp_tokens.fc1.weight`)      | exact            |
| .pth.tar        | timm's training checkpoint, read if it holds only tensors | exact            |
| .safetensors    | ours (config, CRC-32 in metadata), or timm's without    | as saved / exact |
| a run directory | the final `model.safetensors` that `mixer train` wrote  | as saved         |
| step-N.pt       | a training state in RUN/checkpoints/ (timm's names)     | RUN/config.json  |

Nothing is ever unpickled: `numpy.load(allow_pickle=False)`, `torch.load(weights_only=True)`, and an
.npz must be a zip archive before NumPy sees it. Every unreadable or unfitting file raises a
CheckpointError whose message is one sentence naming the file and what to do.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickle
import re
import secrets
import stat
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional, TypeVar, overload

import numpy as np
import torch

from .model import MlpMixer, checked_pool
from .variants import SHAPE_FIELDS, MixerConfig, as_pair

RUN_MODEL_FILE = "model.safetensors"
# What `mixer train` writes in a run directory, beside its training states (STATE_DIR/step-NNNNNNNN.pt).
RUN_FILES = (RUN_MODEL_FILE, "config.json", "metrics.jsonl", "curves.png")
STATE_DIR = "checkpoints"
TORCH_EXTENSIONS = (".pth", ".pt", ".bin")
EXTENSIONS = (".npz", ".safetensors", *TORCH_EXTENSIONS)
TIMM_TRAINING_SUFFIX = ".pth.tar"  # timm's train.py writes model_best.pth.tar, a torch.save file
FORMAT_TAG = "mlpmixer"

StateDict = dict[str, torch.Tensor]
_Model = TypeVar("_Model", bound=torch.nn.Module)  # load_checkpoint returns the model it is given


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


def official_to_state(arrays: dict[str, np.ndarray], source: str = "The .npz file") -> StateDict:
    """Official Flax arrays -> our state dict. Dense kernels (in, out) become (out, in)."""
    arrays = {k.removeprefix("params/"): v for k, v in arrays.items()}
    num_blocks = _count_blocks(arrays, r"MixerBlock_(\d+)/")
    state: StateDict = {}
    used = set()
    if "stem/kernel" in arrays:  # (P, P, in, C) -> (C, in, P, P)
        if arrays["stem/kernel"].ndim != 4:
            raise CheckpointError(
                f"{source} has a stem/kernel of shape {arrays['stem/kernel'].shape}, not (P, P, in, C); "
                "it is not an MLP-Mixer checkpoint."
            )
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
            f"{source} has keys that are not in the official Mixer layout ({_short(unexpected)}); "
            "it is not an MLP-Mixer checkpoint."
        )
    return state


def state_to_official(state: StateDict) -> dict[str, np.ndarray]:
    """Our state dict -> official Flax arrays (Dense kernels (in, out)), dtype kept; bfloat16, which
    NumPy lacks, is widened to float32 (exactly)."""
    num_blocks = _count_blocks(state, r"blocks\.(\d+)\.")
    arrays = {"stem/kernel": state["stem.proj.weight"].permute(2, 3, 1, 0)}
    pairs = list(_official_pairs(num_blocks))
    if "head.weight" in state:
        pairs += [("head/kernel", "head.weight", "dense"), ("head/bias", "head.bias", "vector")]
    for official, ours, kind in pairs:
        arrays[official] = state[ours].T if kind == "dense" else state[ours]
    return {k: _to_numpy(v) for k, v in arrays.items()}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy()


# ---------------------------------------------------------------------------------------------
# The configuration a state dict implies.


def infer_config(
    state: StateDict, gelu: str, img_size: Any = None, img_size_hint: Any = None, source: str = "The checkpoint"
) -> MixerConfig:
    """Shapes -> MixerConfig: P, in_chans and C from the stem, S and D_S from token mixing, D_C from
    channel mixing, N from the block count, classes from the head. The image size is `img_size` when its
    patch grid has S tokens, else `img_size_hint` (the size of the model being loaded into, or mixer info's
    --img-size) when its grid has S tokens, else the square grid of S tokens. An `img_size` of another token
    count is not the file's: the configuration keeps the file's own size, and the caller says what does not fit."""
    try:
        c, in_chans, ph, pw = state["stem.proj.weight"].shape
        d_s, s = state["blocks.0.mlp_tokens.fc1.weight"].shape
        d_c = state["blocks.0.mlp_channels.fc1.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            f"{source} lacks the stem or first block of a Mixer ({e}); it is not an MLP-Mixer checkpoint."
        ) from None

    def has_s_tokens(size: Any) -> bool:
        h, w = as_pair(size)
        return (h // ph) * (w // pw) == s

    side = math.isqrt(s)
    if img_size is not None and has_s_tokens(img_size):
        img_size = as_pair(img_size)
    elif img_size_hint is not None and has_s_tokens(img_size_hint):
        # Before the square guess: a 2×8 grid has 16 tokens too, and a size that gives them is the caller's word.
        img_size = as_pair(img_size_hint)
    elif side * side == s:
        img_size = (side * ph, side * pw)
    elif img_size_hint is not None:  # the size of the model loaded into, or mixer info's --img-size
        h, w = as_pair(img_size_hint)
        raise CheckpointError(
            f"{source} has {s} tokens of {ph}×{pw} patches, which form no square grid and which {h}×{w} images "
            "do not give, so its image size is unknown; give the size it was made for (load_checkpoint(path, "
            "img_size=(height, width)) without a model, --img-size H W for mixer info and convert)."
        )
    elif img_size is not None:
        h, w = as_pair(img_size)
        raise CheckpointError(
            f"{source} has {s} tokens of {ph}×{pw} patches, which {h}×{w} images do not give; pass the "
            "img_size it was made for (then mlpmixer.resize_to(model, size) converts it to another)."
        )
    else:
        raise CheckpointError(
            f"{source} has {s} tokens, which do not form a square patch grid, so its image size is "
            "unknown; pass img_size=(height, width), or on the command line give --img-size H W (mixer info "
            "and convert take it; `mixer convert FILE MODEL.safetensors --img-size H W` once makes a file that "
            "keeps the size for the other commands)."
        )
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


def first_line(error: BaseException) -> str:
    """An error's first line (its type's name when it has no message), for our one-sentence errors."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _short(items: list[str], limit: int = 6) -> str:
    more = f", … ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _read_npz(path: Path) -> StateDict:
    # An .npz is a zip archive. Checked first because np.load takes anything else for a pickle, and
    # its refusal would then read like "object arrays" for a file that is merely corrupt.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not an .npz archive (truncated, corrupt, or another kind of file); "
            "re-download or re-save it."
        )
    name: Optional[str] = None  # the array being read: the errors of zlib and of NumPy's .npy reader do not name it
    arrays: dict[str, Any] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for name in npz.files:
                arrays[name] = npz[name]
    except (ValueError, zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as e:
        if isinstance(e, ValueError) and "allow_pickle" in str(e):
            raise CheckpointError(
                f"{path} holds Python objects (object arrays{f', {name}' if name else ''}), which are never "
                "unpickled; save the weights as plain numeric arrays."
            ) from None
        if name is not None and f"'{name}.npy'" not in str(e):  # zipfile's "Bad CRC-32 for file 'X.npy'" names it
            what = f"array {name} truncated or corrupt: "
        else:  # NumPy's own ValueErrors say what is wrong
            what = "" if isinstance(e, ValueError) else "truncated or corrupt: "
        raise CheckpointError(f"{path} is not a readable .npz file ({what}{e}); re-download or re-save it.") from None
    # Members that are not .npy files come back as raw bytes.
    bad = [k for k, v in arrays.items() if not (isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.floating))]
    if bad:
        raise CheckpointError(f"{path} has non-float arrays ({_short(bad)}); it is not a Mixer checkpoint.")
    return official_to_state(arrays, str(path))


def zip_damage(path: str | os.PathLike) -> Optional[str]:
    """What is wrong with a zip archive (torch.save's format) whose bytes do not match the CRC-32 each
    member carries, or None: torch.load does not check them (np.load does for an .npz), so damaged bytes
    would load as damaged weights. Reading them costs about 1 s per GB."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # the first member whose bytes do not match their CRC-32
        return damaged and f"Bad CRC-32 for file '{damaged}'"  # zipfile's words, as for an .npz
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        return first_line(e)


def _read_torch(path: Path) -> tuple[StateDict, bool]:
    """The weights of a PyTorch file, and whether it is a training state of `mixer train` (train.save_state)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("/constants.pkl") for name in archive.namelist()):
                raise CheckpointError(f"{path} is a TorchScript program (as `mixer export` writes), not a "
                                      "checkpoint; give the checkpoint it was exported from.")
        reason = zip_damage(path)
        if reason:
            raise CheckpointError(f"{path} is not a readable PyTorch file (truncated or corrupt: {reason}); "
                                  "re-download or re-save it.")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise for a user
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's files are zip archives (or, in the legacy format, start with a pickle's 0x80
        # opcode); anything else refused by the unpickler is just not a checkpoint.
        with open(path, "rb") as f:
            is_pickle = f.read(1) == b"\x80" or zipfile.is_zipfile(path)
        if not is_pickle:
            raise CheckpointError(
                f"{path} is not a readable PyTorch file (corrupt or another kind of file); "
                "re-download or re-save it."
            ) from None
        if "argparse.Namespace" in str(e):  # torch names the class it refused: timm's training arguments
            raise CheckpointError(
                f"{path} is a timm training checkpoint, whose arguments (an argparse.Namespace) are never "
                "unpickled; if you trust the file, keep only its weights, in Python: "
                f"torch.save(torch.load('{path}', weights_only=False)['state_dict'], 'model.pth'), and load that."
            ) from None
        raise CheckpointError(
            f"{path} contains Python objects other than tensors and was not loaded (it is never unpickled); "
            "save a plain state dict of tensors, or use .safetensors."
        ) from None
    except Exception as e:  # noqa: BLE001 - the legacy reader meets garbage with KeyError, IndexError, ...
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] != b"\x80" and head != b"PK":  # neither a legacy pickle nor a zip archive, cut short or not:
            # the legacy reader's error ("101", a KeyError on a byte of the file) would say nothing.
            raise CheckpointError(
                f"{path} is not a readable PyTorch file (corrupt or another kind of file); "
                "re-download or re-save it."
            ) from None
        # torch's zip reader explains itself over several sentences ("... This is an internal miniz
        # error. If you are seeing this error, ..."): its first one names the problem.
        reason = first_line(e).split(". ")[0].rstrip(".")
        raise CheckpointError(
            f"{path} is not a readable PyTorch file (truncated or corrupt: {reason}); re-download or re-save it."
        ) from None
    training_state = isinstance(obj, dict) and {"model", "optimizer", "step", "ema"} <= obj.keys()
    # Training checkpoints often nest the weights.
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors; save model.state_dict().")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}, training_state


def weights_crc32(state: StateDict) -> str:
    """A CRC-32 of the tensors' bytes, in name order, as 8 hex digits: what our .safetensors files carry
    in their metadata, as zip members (torch.save) and .npz arrays carry theirs, since the format itself
    checks only its header, so a changed byte in a weight would load as a changed weight. 0.075 s for 240 MB
    (this project's CPU, 2026-11-28)."""
    crc = 0
    for name in sorted(state):
        crc = zlib.crc32(state[name].contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


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
    # Files of other programs, and ours from before 2026-11-28, carry no checksum.
    if "crc32" in metadata and weights_crc32(state) != metadata["crc32"]:
        raise CheckpointError(f"{path} is corrupt: its weights do not match the CRC-32 saved with them; re-download "
                              "or re-save it.")
    return state, metadata


# What each kind of file is called, and the extension that reads it.
_KINDS = {"npz": ("an official .npz archive", ".npz"), "torch": ("a PyTorch file", ".pth"),
          "safetensors": ("a .safetensors file", ".safetensors")}


def _file_kind(path: Path) -> Optional[str]:
    """Which of the formats the bytes of `path` unmistakably are ("npz", "torch" or "safetensors"), or None
    (truncated, corrupt, a bare pickle, anything else): for a file named with another format's extension."""
    try:
        with open(path, "rb") as f:
            head = f.read(10)
        if head[:2] == b"PK" and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
            if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):  # torch.save's zip format
                return "torch"
            if names and all(n.endswith(".npy") for n in names):
                return "npz"
            return None
        length = int.from_bytes(head[:8], "little")  # safetensors: the header's length, then its JSON
        if len(head) == 10 and head[8:10] == b'{"' and length <= path.stat().st_size - 8:
            return "safetensors"
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError, ValueError):
        pass
    return None


def _check_kind(path: Path, expected: str) -> None:
    """Refuse a file whose bytes are another format than its extension names, saying so (the reader of the
    extension's format would call it truncated or corrupt)."""
    kind = _file_kind(path)
    if kind is not None and kind != expected:
        suffix = TIMM_TRAINING_SUFFIX if path.name.lower().endswith(TIMM_TRAINING_SUFFIX) else path.suffix
        raise CheckpointError(f"{path} is {_KINDS[kind][0]}, not {_KINDS[expected][0]} as its extension "
                              f"{suffix!r} says; rename it to end in {_KINDS[kind][1]}.")


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
    if p.suffix.lower() in (".onnx", ".pt2"):
        raise CheckpointError(f"{p} is an exported model (`mixer export`), not a checkpoint; give the checkpoint "
                              "it was exported from.")
    if p.suffix.lower() not in EXTENSIONS and not p.name.lower().endswith(TIMM_TRAINING_SUFFIX):
        raise CheckpointError(
            f"{p} has an unknown checkpoint extension {p.suffix!r}; use one of {', '.join(EXTENSIONS)}."
        )
    return p


def run_config(run: Path) -> dict[str, Any] | None:
    """The config.json of the `mixer train` run in `run`, None where there is none. mixer train writes a JSON
    object with "model" and "recipe" objects: anything else (edited, damaged) is one sentence naming it, not an
    AttributeError or KeyError deep in resuming."""
    path = run / "config.json"
    try:
        config = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:  # not JSON, or not UTF-8 text
        config = None
    if not (isinstance(config, dict) and isinstance(config.get("model"), dict)
            and isinstance(config.get("recipe"), dict)):
        raise CheckpointError(f"{path} is not a run configuration as mixer train writes it (a JSON object with "
                              "\"model\" and \"recipe\" objects); restore it, or delete it to resume with the "
                              "command's settings.")
    return config


def read_checkpoint(
    path: str | os.PathLike, *, img_size_hint: Any = None, **overrides: Any
) -> tuple[StateDict, MixerConfig, dict[str, Any]]:
    """Read a checkpoint into (state dict in our names, its configuration, extra metadata).

    `overrides` change configuration fields (gelu, img_size, drop_path_rate, ...) before building.
    `img_size_hint` is the image size to assume for a foreign file when its patch grid has the file's token
    count (a 2×8 grid, which the 16 tokens alone would make 4×4), or when no square grid does.
    Extra metadata holds `layout` ("mlpmixer": the configuration was in the file; "official" or "timm":
    it was inferred from the shapes; "training state": a `mixer train` state, RUN/checkpoints/step-N.pt,
    configured by RUN/config.json, then named in `run_config`, else inferred from its shapes) and
    `class_names` where the file or its run carries them, and `global_pool` where the file carries it (ours).
    """
    p = resolve_path(path)
    suffix = p.suffix.lower()
    extra: dict[str, Any] = {}
    img_size = overrides.get("img_size")
    _check_kind(p, "npz" if suffix == ".npz" else "safetensors" if suffix == ".safetensors" else "torch")
    if suffix == ".npz":
        state = _read_npz(p)
        extra["layout"] = "official"
        config = infer_config(state, gelu="tanh", img_size=img_size, img_size_hint=img_size_hint, source=str(p))
    elif suffix in TORCH_EXTENSIONS or p.name.lower().endswith(TIMM_TRAINING_SUFFIX):
        state, training_state = _read_torch(p)
        run = run_config(p.parent.parent) if training_state else None
        extra["layout"] = "training state" if training_state else "timm"
        if run is not None:
            run_file = p.parent.parent / "config.json"
            config, names = _saved_config(run_file, run["model"], run.get("class_names"), "restore it")
            extra["run_config"] = str(run_file)
            if names is not None:
                extra["class_names"] = names
        else:  # the shapes say all but the GELU (timm's) and a non-square grid's image size
            config = infer_config(state, gelu="exact", img_size=img_size, img_size_hint=img_size_hint, source=str(p))
    else:
        state, metadata = _read_safetensors(p)
        if metadata.get("format") == FORMAT_TAG:
            config, names, extra["global_pool"] = _parse_metadata(p, metadata)
            extra["layout"] = "mlpmixer"
            if names is not None:
                extra["class_names"] = names
        else:
            extra["layout"] = "timm"
            config = infer_config(state, gelu="exact", img_size=img_size, img_size_hint=img_size_hint, source=str(p))
    bad = [k for k, v in state.items() if not v.is_floating_point()]  # the .npz reader refuses them too
    if bad:
        raise CheckpointError(f"{p} has non-float tensors ({_short(bad)}); it is not a Mixer checkpoint.")
    try:
        wanted = config.replace(**overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"Cannot apply {overrides} to the configuration of {p} ({e}); pass only MixerConfig fields "
            "with valid values."
        ) from None
    if img_size is not None:
        _check_size_given(p, config, img_size)
    # Checked against the file's own configuration, so that the message can say what the file holds.
    problem = _misfit(p, config, wanted, overrides)
    if problem:
        raise CheckpointError(problem)
    return state, wanted, extra


def _check_size_given(path: Path, config: MixerConfig, img_size: Any) -> None:
    """Refuse an image size given for a file (img_size=, mixer info's and convert's --img-size) that is not the size
    of `config`, the file's: one it records (ours, a run's), or, for a file that records none, the one its patch
    grid gives (`infer_config` takes a given size whose grid has the file's token count). Relabelling a file's size
    would reinterpret its token-mixing weights, learned on a 4×4 grid, say, as those of a 2×8 one."""
    try:
        asked = as_pair(img_size)
    except ValueError:
        return  # not a size: config.replace says so
    if asked != config.img_size:
        (h, w), s = config.img_size, config.num_tokens
        raise CheckpointError(
            f"{path} is made for {h}×{w} images, not {asked[0]}×{asked[1]}: an image size given with a checkpoint "
            "(img_size=, --img-size) only names the size of a file that does not record it, and gives as many "
            f"patches as the file has tokens ({s}); leave it out, or convert the model to another size with "
            "mlpmixer.resize_to (mixer resize)."
        )


def _parse_metadata(path: Path, metadata: dict[str, str]) -> tuple[MixerConfig, list[str] | None, str]:
    """Our .safetensors metadata -> (configuration, class names or None, global_pool)."""
    fix = "re-save it with this version of mlpmixer"
    # The pooling is the model's, not its configuration's (timm's create_model argument); files written before
    # it was saved (2026-11-29) come from models that pooled by the mean, the only pooling then saved right.
    pool = metadata.get("global_pool", "avg")
    try:
        saved = json.loads(metadata["config"])
        names = json.loads(metadata["class_names"]) if "class_names" in metadata else None
        checked_pool(pool)
    except (KeyError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} has a damaged or unknown mlpmixer configuration in its metadata "
                              f"({first_line(e).rstrip('.')}); {fix}.") from None
    return (*_saved_config(path, saved, names, fix), pool)


def _saved_config(path: Path, saved: Any, names: Any, fix: str) -> tuple[MixerConfig, list[str] | None]:
    """A configuration and class names as our files hold them (JSON) -> (configuration, class names or None);
    damaged ones are one sentence naming `path` and ending in `fix`."""
    try:
        config = MixerConfig.from_dict(saved)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has a damaged or unknown mlpmixer configuration ({e}); {fix}.") from None
    # Each case its own words: names of the right count that are not strings are no mismatch with the head.
    if names is not None and not isinstance(names, list):
        raise CheckpointError(f"{path} has class names that are not a list ({_shown(names)}); {fix} with a list of "
                              "one name per class.")
    if names is not None and len(names) != config.num_classes:
        raise CheckpointError(f"{path} lists {len(names)} class names for its {config.num_classes}-class head; "
                              f"{fix} with one name per class.")
    bad = [n for n in names or [] if not isinstance(n, str)]
    if bad:
        raise CheckpointError(f"{path} lists class names that are not strings ({_shown(bad[0])} is of type "
                              f"{type(bad[0]).__name__}); {fix} with a string per class.")
    return config, names


# The fields the shapes of a model's weights fix (the token count, from the image size, apart).
_FIXED_FIELDS = sorted(SHAPE_FIELDS | {"in_chans"})


def _about(config: MixerConfig) -> str:
    """A model as our messages name it: "Mixer-B/16 with 1000 classes at 224×224"."""
    return f"{config.describe()} with {config.num_classes} classes at {config.img_size[0]}×{config.img_size[1]}"


def _misfit(path: Any, have: MixerConfig, want: MixerConfig, overrides: dict[str, Any] | None = None) -> str | None:
    """Why the weights in `path`, of a model configured as `have`, cannot make one configured as `want` (the
    model they are loaded into, or, given `overrides`, `have` with those), as one sentence with the fix; None
    when their shapes fit. With overrides a different head is fine: load_checkpoint gives a new one."""
    fixed = [f for f in _FIXED_FIELDS if getattr(have, f) != getattr(want, f)]
    # The values, as describe() leaves some out (in_chans, D_S, D_C).
    fixed_in_file = ", ".join(f"{f}={getattr(have, f)!r}" for f in fixed)
    if fixed and overrides is not None:
        fix = (f"the shapes of its weights fix {fixed_in_file}, so load it without "
               f"{'that override' if len(fixed) == 1 else 'those overrides'} (another architecture needs its "
               "own checkpoint, or training from scratch)")
    elif fixed:
        fix = (f"the shapes of its weights fix {fixed_in_file}, and the model has "
               f"{', '.join(f'{f}={getattr(want, f)!r}' for f in fixed)}, so build the model from the file "
               "instead (mlpmixer.load_checkpoint(path)), or pick a checkpoint of that model")
    elif have.num_tokens != want.num_tokens:
        h, w = want.img_size
        fix = (f"its token-mixing weights fix {have.num_tokens} tokens, not {want.num_tokens}, so load it at its "
               f"own size and convert it with mlpmixer.resize_to(model, ({h}, {w})) (mixer resize on the command "
               "line), the paper's way to a higher resolution")
    elif have.num_classes != want.num_classes and overrides is None:
        fix = (f"build it with mlpmixer.load_checkpoint(path, num_classes={want.num_classes}), which gives it a "
               "new zero-initialised head of that size")
    else:
        return None
    if overrides is None:
        return f"{path} holds a {_about(have)}, which does not fit the {_about(want)} it is loaded into: {fix}."
    asked = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    return f"{path} holds a {_about(have)}, which cannot load as a {_about(want)} ({asked}): {fix}."


def _natural(key: str) -> list[Any]:
    """Sort key putting blocks.2 before blocks.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _compare(state: StateDict, expected: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    missing = sorted(set(expected) - set(state), key=_natural)
    unexpected = sorted(set(state) - set(expected), key=_natural)
    misshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected), key=_natural)
        if state[k].shape != expected[k].shape
    ]
    return missing, unexpected, misshaped


@overload
def load_checkpoint(path: str | os.PathLike, model: None = None, **overrides: Any) -> MlpMixer: ...
@overload
def load_checkpoint(path: str | os.PathLike, model: _Model, **overrides: Any) -> _Model: ...
def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module | None = None, **overrides: Any) -> Any:
    """Build a model from a checkpoint file or run directory, or load it into `model`.

    Without `model`, the configuration comes from the file (ours, with its pooling) or its shapes (.npz,
    timm), with `overrides` applied: those that keep the shapes of the weights (gelu, drop rates, the image
    size of a file that does not record it, giving as many patches as the file has tokens), and `num_classes`,
    which, when it differs from the file's, drops its head and puts a new zero-initialised one (for
    fine-tuning). The model is float32 whatever dtype the file holds (bfloat16 weights widen exactly): call
    `.to(torch.bfloat16)` for a bf16 model.

    With `model` (an MlpMixer, or a wrapper of one such as fast.optimize's FastMixer), the file's
    weights must have its shapes; only the tensors are copied, in the model's own dtype and device.
    The model keeps its own configuration, GELU and pooling included: .npz and timm files cannot say theirs,
    and a file of ours whose GELU differs gets a warning.
    """
    if model is not None and overrides:
        raise ValueError(f"load_checkpoint loads into the given model as it is; {', '.join(sorted(overrides))} "
                         "cannot change it (build the model with them, or load without a model).")
    target = unwrap(model, "load_checkpoint") if model is not None else None
    hint = target.config.img_size if target is not None else None
    state, config, extra = read_checkpoint(path, img_size_hint=hint, **overrides)
    names = extra.get("class_names")
    if model is None:
        new_head = "num_classes" in overrides and overrides["num_classes"] != _head_classes(state)
        if new_head:
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            names = None  # the file's classes went with its head
        # Built on the meta device (no memory, no initialisation) and then given the file's tensors:
        # initialising weights only to overwrite them costs seconds for the large variants.
        with torch.device("meta"):
            model = MlpMixer(config, extra.get("global_pool", "avg"))
        _load_state(model, state, path, config, ignore_missing_head=new_head, assign=True)
        if new_head:
            model.reset_classifier(config.num_classes)  # a real, zero-initialised head
    else:
        problem = _misfit(path, config, target.config)
        if problem:
            raise CheckpointError(problem)
        if extra["layout"] == "mlpmixer" and config.gelu != target.config.gelu:
            warnings.warn(f"{path} was saved from a model with {config.gelu} GELU; the model it is loaded into "
                          f"keeps its {target.config.gelu} GELU, so its outputs differ slightly from the saved "
                          "model's (load the file alone, mlpmixer.load_checkpoint(path), to keep the file's).",
                          stacklevel=2)
        _load_state(target, state, path, config)
    if names is not None:  # a given model keeps its own names when the file has none
        (target or model).class_names = names
    return model


def _head_classes(state: StateDict) -> int:
    head = state.get("head.weight")
    return 0 if head is None else head.shape[0]


def check_tensors(
    path: Any, state: StateDict, config: MixerConfig, expected: Optional[dict[str, torch.Tensor]] = None,
    ignore_missing_head: bool = False,
) -> None:
    """Refuse, in one sentence, a state dict (as `read_checkpoint` returns it) without every tensor of the model
    that `config` describes, in its shape (`expected`: that model's state dict, else built without memory).
    `read_checkpoint` first refuses a file of another architecture (_misfit), so what is left to find here are
    files whose tensors do not agree with each other or with their configuration (a missing key, a gap in the
    block numbers, metadata naming other widths than the weights have)."""
    if expected is None:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            expected = MlpMixer(config).state_dict()
    missing, unexpected, misshaped = _compare(state, expected)
    if ignore_missing_head:
        missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected or misshaped:
        parts = [f"missing keys: {_short(missing)}" if missing else "",
                 f"unexpected keys: {_short(unexpected)}" if unexpected else "",
                 f"mis-shaped: {_short(misshaped, 3)}" if misshaped else ""]
        detail = "; ".join(p for p in parts if p)
        raise CheckpointError(
            f"{path} does not hold the tensors of the {_about(config)} it describes ({detail}); it is damaged or "
            "not a Mixer checkpoint: re-save it from its model, or pick another file."
        )


def _load_state(
    model: MlpMixer, state: StateDict, path: Any, config: MixerConfig, ignore_missing_head: bool = False,
    assign: bool = False,
) -> None:
    """Copy `state` into `model` (or, with `assign`, make its tensors the model's), after checking
    that every key and shape fits (`check_tensors`)."""
    expected = model.state_dict()
    check_tensors(path, state, config, expected, ignore_missing_head)
    device = None if assign else next(iter(expected.values())).device
    model.load_state_dict({k: v.to(device=device, dtype=expected[k].dtype) for k, v in state.items()},
                          strict=not ignore_missing_head, assign=assign)


# ---------------------------------------------------------------------------------------------
# Writing files.


# atomic_write's temporary names: ".NAME.<12 hex digits>.tmp.SUFFIX".
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.tmp(\.[^.]+)?")


def remove_temporaries(folder: str | os.PathLike, of: Optional[str] = None) -> list[Path]:
    """Delete the temporary files that atomic_write left in `folder` when it was killed before its rename
    (only names of its own pattern; with `of`, only those of the file of that name); returns them. Call it
    where no other write (of that file) is under way."""
    pattern = _TEMPORARY
    if of is not None:
        pattern = re.compile(re.escape(f".{of}.") + r"[0-9a-f]{12}\.tmp" + re.escape(Path(of).suffix))
    stale = [p for p in Path(folder).glob(".*.tmp*") if pattern.fullmatch(p.name) and p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Call `write(tmp_path)` then move the finished file into place: a crash leaves the old file.

    The temporary file is fsynced before the rename, and the directory after it.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the name of a file to write.")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the nearest existing folder: mkdir makes the rest
        folder = folder.parent
    if not folder.is_dir():  # mkdir would say "[Errno 17] File exists: 'x'", which names no fix
        raise NotADirectoryError(f"Cannot write {path}: it lies under {folder}, which is a file; give a path in a "
                                 "folder.")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created as an ordinary file (mode 0666 less the umask), and that mode restored after `write`:
    # tempfile.mkstemp, and some writers (safetensors, torch.save), leave private 0600 files.
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp{path.suffix}")
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except OSError as e:  # read-only, /proc, ...: errno's line would name our temporary file, not the user's path
        # The same class (callers catch PermissionError), and one sentence.
        raise type(e)(f"Cannot write {path}: no file can be created in {path.parent} ({e.strerror}); give a path "
                      "in another folder.") from None
    mode = stat.S_IMODE(os.stat(tmp).st_mode)
    try:
        write(tmp)
        os.chmod(tmp, mode)
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


def check_writable_folder(folder: str | os.PathLike, option: str) -> None:
    """A folder `option` names (--out, --report), or the file to write in it (export's --out), that is a file,
    lies under a file or in a folder this user cannot write to: one sentence before anything runs, not
    mkdir's "[Errno 17] File exists" once the work is done."""
    run = Path(folder)
    folder = run
    while not folder.exists() and folder != folder.parent:  # the nearest existing folder: mkdir makes the rest
        folder = folder.parent
    if not folder.is_dir():
        if folder == run:
            raise NotADirectoryError(f"{option} {run} is a file; give the path of a folder.")
        # "give the path of a folder" would misdirect export, whose --out is a file in one.
        raise NotADirectoryError(f"{option} {run} lies under {folder}, which is a file; give another {option}.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {run}: {folder} is not writable for this user; give another {option}, or "
                              "change its permissions.")
    try:  # os.access lets root write anywhere, /proc too, where creating a file fails all the same
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise PermissionError(f"{option} {run}: no file can be created in {folder} ({e.strerror}); give another "
                              f"{option}.") from None


def save_checkpoint(model: MlpMixer, path: str | os.PathLike, class_names: list[str] | None = None) -> Path:
    """Write `model` in the format its extension names (see the module docstring), atomically.

    Our .safetensors keeps the configuration, the pooling (`global_pool`), class names and dtypes; .npz is the
    official layout; .pth/.pt/.bin a timm-compatible state dict (which timm and `load_checkpoint` read with exact
    GELU). What those foreign formats lose of this model (a GELU other than the one their format implies, a
    non-square grid's image size, a head that sees every token, class names) is a warning each (`format_notes`).
    Class names (`class_names`, else the model's) must be a list of strings, one per class.
    """
    given = os.fspath(path)
    path = Path(path)
    if given.endswith(("/", os.sep)) or path.is_dir():  # Path drops a trailing slash: "x.safetensors/" would be a file
        raise CheckpointError(f"Cannot write {given}: it names a folder; give the file to write, ending in one of "
                              f"{', '.join(EXTENSIONS)} (say {path / 'model.safetensors'}).")
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise CheckpointError(f"Cannot write {path}: unknown extension {path.suffix!r}; use one of "
                              f"{', '.join(EXTENSIONS)}.")
    model = unwrap(model)
    if not isinstance(model.norm, torch.nn.LayerNorm):  # what a file of this config would need to load back
        raise CheckpointError(f"Cannot write {path}: the model's final LayerNorm was pruned (prune_intermediate_layers "
                              "with prune_norm=True), and a checkpoint rebuilds the whole model; save it before "
                              "pruning, or prune after loading.")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    names = class_names if class_names is not None else getattr(model, "class_names", None)
    if names is not None:
        names = _checked_class_names(names, model.num_classes, path)
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {"format": FORMAT_TAG, "config": model.config.to_json(), "crc32": weights_crc32(state),
                    "global_pool": model.global_pool}
        if names:
            metadata["class_names"] = json.dumps(names)
        written = atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    elif suffix == ".npz":
        arrays = state_to_official(state)
        written = atomic_write(path, lambda tmp: _savez(tmp, arrays))
    else:  # TORCH_EXTENSIONS
        written = atomic_write(path, lambda tmp: _torch_save(tmp, state))
    # Said once the file is written: a path that cannot be written is an error with no warning about a file
    # that does not exist.
    for note in format_notes(path, model):
        warnings.warn(note, stacklevel=2)
    return written


def _checked_class_names(names: Any, num_classes: int, path: Path) -> list[str]:
    """The class names to save with a model, refused here in one sentence unless they are a list of strings, one
    per class: the loader refuses any others, so the file would not load back (and a string would be saved as its
    letters)."""
    if not isinstance(names, (list, tuple)):
        raise CheckpointError(f"Cannot write {path}: class names are a list of strings, one per class, not "
                              f"{_shown(names)}; give them as a list.")
    if len(names) != num_classes:
        raise CheckpointError(f"{len(names)} class names do not fit the {num_classes}-class head of the model "
                              f"to save to {path}; give one name per class.")
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise CheckpointError(f"Cannot write {path}: class names are strings, and {_shown(bad[0])} is of type "
                              f"{type(bad[0]).__name__}; give each class its name as a string (str(name)).")
    doubled = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if doubled:
        # Warned, not refused: a run whose data named a class twice must not lose its model at the final save.
        warnings.warn(f"The class names saved to {path} repeat {_short([repr(n) for n in doubled])}, so per-class "
                      "reports and predictions cannot tell those classes apart; give each class its own name.",
                      stacklevel=3)
    return list(names)


def _shown(value: Any, limit: int = 40) -> str:
    """A value as a message quotes it, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def unwrap(model: torch.nn.Module, caller: str = "save_checkpoint") -> MlpMixer:
    """The MlpMixer inside the wrappers training and inference put around it (torch.compile's
    `_orig_mod`, fast.optimize's `model`, CompiledOrEager's `eager`, DDP's `module`), whose state dict
    names are those of the model itself."""
    while not isinstance(model, MlpMixer):
        inner = next((getattr(model, a) for a in ("_orig_mod", "model", "eager", "module")
                      if isinstance(getattr(model, a, None), torch.nn.Module)), None)
        if inner is None:
            raise CheckpointError(f"{caller} takes an MlpMixer (or a wrapper of one), not a "
                                  f"{type(model).__name__}.")
        model = inner
    return model


def _savez(tmp: str, arrays: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to the name
        np.savez(f, **arrays)


def _torch_save(tmp: str, state: StateDict) -> None:
    # A file object: given a name, torch.save names the archive's folder after it, here the random temporary
    # name, which errors would then quote and which made two saves of one model differ (register_weights' sha256).
    with open(tmp, "wb") as f:
        torch.save(state, f)


def convert(src: str | os.PathLike, dst: str | os.PathLike, **overrides: Any) -> MlpMixer:
    """Read any supported checkpoint and write it in the format of `dst`'s extension."""
    check_not_the_source(src, dst)
    model = load_checkpoint(src, **overrides)
    save_checkpoint(model, dst)
    return model


def check_not_the_source(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Refuse to write a converted model over the checkpoint it comes from, or over a file of a `mixer train`
    run (`check_not_a_run_file`)."""
    if Path(dst).expanduser().resolve() == resolve_path(src).resolve():
        raise CheckpointError(f"{dst} is the checkpoint being read; write the new one to another file.")
    check_not_a_run_file(dst)


def check_not_a_run_file(dst: str | os.PathLike) -> None:
    """Refuse to write over a file of a `mixer train` run (a folder whose config.json is a run's): its model,
    metrics, curves or a training state. An export or a conversion written there replaced the run's model, or the
    state that --resume then could not read. A link named `dst` is replaced, not what it points to (atomic_write),
    so it is judged where it lies."""
    p = Path(dst).expanduser()
    p = p.parent.resolve() / p.name

    def is_run(folder: Path) -> bool:  # another tool's config.json (a Hugging Face model's) is not a run's
        try:
            return run_config(folder) is not None
        except CheckpointError:
            return False

    if p.name in RUN_FILES and is_run(p.parent):
        what = f"the {p.name} of the run in {p.parent}"
    elif p.parent.name == STATE_DIR and p.name.startswith("step-") and p.suffix == ".pt" and is_run(p.parent.parent):
        what = f"a training state of the run in {p.parent.parent}"
    else:
        return
    raise CheckpointError(f"{dst} is {what}, which the commands reading the run (and --resume) need; write to "
                          "another file.")


def format_notes(path: str | os.PathLike, model: MlpMixer) -> list[str]:
    """What a file without our metadata (.npz, timm's formats) at `path` cannot carry of `model`, one
    sentence each, which save_checkpoint warns of; none for our .safetensors, which keeps everything."""
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        return []
    implied = "tanh" if suffix == ".npz" else "exact"  # what load_checkpoint assumes for this format
    layout = "official .npz" if suffix == ".npz" else "timm-format"
    c = model.config
    notes = []
    if c.gelu != implied:
        notes.append(f"{path} will load with {implied} GELU, as {layout} files carry no configuration, but "
                     f"this model uses {c.gelu} GELU: to keep it, save as .safetensors, or load the file with "
                     f"gelu='{c.gelu}' (mixer convert --gelu {c.gelu}).")
    (h, w), (ph, pw) = c.img_size, c.patch_size
    if h // ph != w // pw:  # the size is read from the token count, as a square grid
        notes.append(f"{layout} files carry no image size, and a {h // ph}×{w // pw} patch grid is not square: "
                     f"load it with img_size=({h}, {w}) (mixer convert --img-size {h} {w}), or keep a "
                     ".safetensors copy for the other commands.")
    if model.global_pool != "avg":
        notes.append(f"{layout} files carry no pooling: {path} will load as a model that averages the tokens, but "
                     "this model's head sees every token (global_pool=''); set model.global_pool = '' after "
                     "loading it, or keep a .safetensors copy.")
    if getattr(model, "class_names", None):
        notes.append(f"{layout} files carry no class names; keep a .safetensors copy to have predict print them.")
    return notes
