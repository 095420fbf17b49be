"""Published Mixer weights: a registry of where they live, and a download cache.

The registry is plain data: the authors' official checkpoints (SPEC §6, Flax `.npz`, tanh GELU) and
timm's converted ones on the Hugging Face hub (`model.safetensors` in timm's layout, exact GELU).
`load_pretrained("B/16", "imagenet1k")` downloads a file once into the cache — `~/.cache/mlpmixer`, or
the folder in the environment variable MLPMIXER_CACHE — and builds the model from it; later calls,
offline ones too, read the cached file. MLPMIXER_OFFLINE=1 forbids any download. A local file (a
file:// URL or a plain path) is read where it is, never copied into the cache.

Not registered: `gsam/Mixer-S_8.npz`, since patch 8 is no Table 1 variant (`load_checkpoint` still
reads the downloaded file, as a custom configuration). No built-in entry carries a SHA-256, as none is
published next to these files: downloads are checked against their announced size, and against a digest
wherever `register_weights` is given one (a cached copy too, each time it is used). Two processes that
download the same file take turns (through a lock file in the cache's .locks/): the second finds it cached.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, Sequence

import torch
from filelock import FileLock
from tqdm import tqdm

from .checkpoints import CheckpointError, check_writable_folder, load_checkpoint, read_checkpoint
from .cli import TRUE_WORDS
from .model import MlpMixer
from .variants import canonical_name, name_img_size, paper_variant_of

CACHE_ENV = "MLPMIXER_CACHE"
OFFLINE_ENV = "MLPMIXER_OFFLINE"
OFFICIAL_URL = "https://storage.googleapis.com/mixer_models/{folder}/Mixer-{name}.npz"
HF_URL = "https://huggingface.co/timm/{model}.{tag}/resolve/main/model.safetensors"

GOOGLE_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # pixels scaled to [-1, 1], as the official code does
UNIT_NORM = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # pixels in [0, 1]: timm's cfg for the MIIL weights


class DownloadError(OSError):
    """A download that failed or did not verify; the message names the URL and the cache path."""


@dataclass(frozen=True)
class Weights:
    """One published checkpoint. `mean`/`std` are the input normalisation it was trained with, per channel
    of pixels in [0, 1]; `load_pretrained` folds any other than the official [-1, 1] into the stem."""

    variant: str  # canonical name, e.g. "B/16"
    tag: str
    url: str
    sha256: str | None = None
    num_classes: int | None = None
    mean: tuple[float, float, float] = GOOGLE_NORM[0]
    std: tuple[float, float, float] = GOOGLE_NORM[1]


_REGISTRY: dict[tuple[str, str], Weights] = {}


def register_weights(
    variant: str,
    tag: str,
    url: str,
    sha256: str | None = None,
    num_classes: int | None = None,
    mean: tuple[float, float, float] = GOOGLE_NORM[0],
    std: tuple[float, float, float] = GOOGLE_NORM[1],
) -> Weights:
    """Add (or replace) the checkpoint `tag` of `variant` ('B/16', 'Mixer-B_16', ...) at `url`.

    `url` may name a local file (file:// or a plain path), which is then used in place. `sha256` and
    `num_classes`, when given, are checked when the file is downloaded (a local file: each time it is
    loaded) and loaded. `mean`
    and `std` are the normalisation the weights were trained with (default: the official [-1, 1]).
    """
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256.strip().lower()):
        raise ValueError(f"sha256 is a SHA-256 digest in 64 hexadecimal digits (as sha256sum prints it), not "
                         f"{sha256!r}.")
    entry = Weights(canonical_name(variant), tag, url, sha256.strip().lower() if sha256 else None, num_classes,
                    tuple(mean), tuple(std))
    _REGISTRY[(entry.variant, tag)] = entry
    return entry


def available() -> list[tuple[str, str, str]]:
    """Every registered checkpoint as (variant, tag, url)."""
    return [(w.variant, w.tag, w.url) for w in _REGISTRY.values()]


def find_weights(name: str, tag: str) -> Weights:
    """The registry entry for variant `name` and `tag`; a ValueError lists the tags there are."""
    variant = canonical_name(name)
    entry = _REGISTRY.get((variant, tag))
    if entry is None:
        tags = sorted(t for v, t in _REGISTRY if v == variant)
        known = f"its published tags are {', '.join(tags)}" if tags else "no weights are published for it"
        raise ValueError(
            f"No pretrained weights {tag!r} for Mixer-{variant}: {known} "
            "(mlpmixer.pretrained.register_weights adds your own)."
        )
    return entry


# The official checkpoints (SPEC §6): folder -> (classes, variants).
for _folder, _classes, _names in (
    ("imagenet1k", 1000, ("B_16", "L_16")),
    ("imagenet21k", 21843, ("B_16", "L_16")),
    ("sam", 1000, ("B_16", "B_32")),
    ("gsam", 1000, ("S_16", "S_32", "B_16", "B_32")),
):
    for _name in _names:
        register_weights(_name, _folder, OFFICIAL_URL.format(folder=_folder, name=_name), num_classes=_classes)

# timm's weights on the Hugging Face hub, with the classes and normalisation of timm's pretrained cfgs.
for _model, _tag, _classes, _norm in (
    ("mixer_b16_224", "goog_in21k_ft_in1k", 1000, GOOGLE_NORM),
    ("mixer_b16_224", "goog_in21k", 21843, GOOGLE_NORM),
    ("mixer_l16_224", "goog_in21k_ft_in1k", 1000, GOOGLE_NORM),
    ("mixer_l16_224", "goog_in21k", 21843, GOOGLE_NORM),
    ("mixer_b16_224", "miil_in21k_ft_in1k", 1000, UNIT_NORM),
    ("mixer_b16_224", "miil_in21k", 11221, UNIT_NORM),
):
    register_weights(_model, _tag, HF_URL.format(model=_model, tag=_tag), num_classes=_classes,
                     mean=_norm[0], std=_norm[1])


# ---------------------------------------------------------------------------------------------
# The download cache.


def cache_dir() -> Path:
    """$MLPMIXER_CACHE, or ~/.cache/mlpmixer."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlpmixer").expanduser()


def cache_path(url: str) -> Path:
    """Where `url` is cached: host and path kept, so that equal file names (every Hugging Face
    repository's model.safetensors, each folder's Mixer-B_16.npz) do not collide."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.netloc or parts.scheme).replace(":", "_")
    pieces = [urllib.parse.unquote(p) for p in parts.path.split("/") if p not in ("", ".", "..")] or ["index"]
    if parts.query:  # ?rev=2 names another file than ?rev=1: the query's digest goes into the name, before its suffix
        last = Path(pieces[-1])
        pieces[-1] = f"{last.stem}-{hashlib.sha256(parts.query.encode()).hexdigest()[:12]}{last.suffix}"
    return cache_dir().joinpath(host, *pieces)


def download(url: str, sha256: str | None = None, retries: int = 3, backoff_s: float = 1.0) -> Path:
    """The cached copy of `url`, downloading it first if needed; returns its path. A local file (a
    file:// URL or a plain path) is returned as it is, after checking `sha256` when given: copying it
    would only duplicate it.

    The file grows as `<name>.part` next to its final place; a broken transfer is retried up to
    `retries` times (waiting `backoff_s`, then twice as long each time), resuming the `.part` with
    an HTTP Range request, as does a later call after a crash. The result must have the announced
    size and, when `sha256` is given, that digest; only then is it moved into place.
    """
    local = _local_path(url)
    if local is not None:
        return _checked_local(local, url, sha256)
    target = cache_path(url)
    if target.is_file() and _cached_as_registered(target, sha256):
        return target
    offline = os.environ.get(OFFLINE_ENV, "")
    if offline.strip().lower() in TRUE_WORDS:
        raise DownloadError(  # names the setting as the user spelled it, the one to unset
            f"{url} is not in the cache ({target}) and {OFFLINE_ENV}={offline} forbids downloading; "
            "connect once without it, or copy the file to that path."
        )
    # A cache that is a file, or lies under one, would fail in mkdir with "[Errno 20] Not a directory".
    check_writable_folder(cache_dir(), CACHE_ENV if os.environ.get(CACHE_ENV) else f"{CACHE_ENV} (unset: the default)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise DownloadError(f"The cache holds a file where {url} needs the folder {target.parent}; give the "
                            f"weights another address, or move that file.") from None
    # Two processes writing one .part left a gap of zeros in the file, which then loaded: they take turns, through a
    # lock file kept in the cache's .locks/ (deleting one could let a third process in while a second waits on it).
    locks = cache_dir() / ".locks"
    locks.mkdir(exist_ok=True)
    with FileLock(str(locks / (hashlib.sha256(str(target).encode()).hexdigest()[:24] + ".lock"))):
        if target.is_file() and _cached_as_registered(target, sha256):  # the other one downloaded it meanwhile
            return target
        _download_into(url, target, sha256, retries, backoff_s)
    return target


def _cached_as_registered(target: Path, sha256: str | None) -> bool:
    """Whether the cached `target` has the registered digest (when one is): a copy that does not (damaged, or an
    older file at that address) is deleted, to be downloaded again."""
    if sha256 is None or _sha256(target) == sha256:
        return True
    print(f"The cached {target} does not have the registered SHA-256; downloading it again.", file=sys.stderr)
    target.unlink()
    return False


def _download_into(url: str, target: Path, sha256: str | None, retries: int, backoff_s: float) -> None:
    """`download`'s transfer into `target`, through its `.part`, with retries and the checks that decide whether
    it is moved into place."""
    part = target.with_name(target.name + ".part")
    print(f"Downloading {url} to {target}", file=sys.stderr)
    for attempt in range(retries + 1):
        try:
            _fetch(url, part)
            break
        except (OSError, http.client.HTTPException) as e:
            if attempt == retries or not _worth_retrying(e):
                raise DownloadError(
                    f"Could not download {url} into {target} ({_reason(e)}); check the address and the "
                    "connection (offline, only cached files load), or put the file at that path by hand."
                ) from None
            time.sleep(backoff_s * 2**attempt)
    if sha256 is not None:
        digest = _sha256(part)
        if digest != sha256.lower():
            part.unlink()
            raise DownloadError(
                f"The download of {url} has SHA-256 {digest}, not the expected {sha256.lower()}, and was "
                f"deleted from {target.parent}; try again, and check the address if it happens again."
            )
    os.replace(part, target)


def _local_path(url: str) -> Path | None:
    """The file that `url` names when it is a file:// URL or a plain path; None for other URLs."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        return Path(urllib.request.url2pathname(parts.path))
    if not parts.scheme or len(parts.scheme) == 1:  # a path; on Windows, "C:\\..." reads as scheme "c"
        return Path(url).expanduser()
    return None


def _checked_local(path: Path, url: str, sha256: str | None) -> Path:
    """`path`, after checking that it is a file with the digest `sha256` (when given)."""
    if not path.is_file():
        there = "a folder" if path.is_dir() else "no file"
        raise DownloadError(f"{url} names a local file, and there is {there} at {path}; check the path given to "
                            "register_weights.")
    if sha256 is not None and (digest := _sha256(path)) != sha256.lower():
        raise DownloadError(f"{path} has SHA-256 {digest}, not the expected {sha256.lower()}; check the file, or "
                            "the digest given to register_weights.")
    return path


def _fetch(url: str, part: Path) -> None:
    """Append the rest of `url` to `part`; raise ConnectionError if it ends short."""
    start = part.stat().st_size if part.exists() else 0
    stream, start, total = _open(url, start)
    with stream, open(part, "r+b" if part.exists() else "wb") as out:
        out.seek(start)
        out.truncate()
        with tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=part.name.removesuffix(".part"), file=sys.stderr, disable=None) as bar:
            while chunk := stream.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        if size > total:
            part.unlink()
        raise ConnectionError(f"received {size:,} of {total:,} bytes")


def _open(url: str, start: int) -> tuple[IO[bytes], int, int | None]:
    """Open `url` at byte `start` if the source allows it: (stream, actual start, total size)."""
    headers = {"User-Agent": "mlpmixer"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # the .part is not a prefix of the file any more: start over
            return _open(url, 0)
        raise
    if response.status == 206:  # Content-Range: bytes START-END/TOTAL
        first, _, size = response.headers.get("Content-Range", "").removeprefix("bytes ").partition("/")
        if first.partition("-")[0] == str(start):
            return response, start, int(size) if size.isdigit() else None
        response.close()
        return _open(url, 0)
    length = response.headers.get("Content-Length")
    return response, 0, int(length) if length and length.isdigit() else None


def _worth_retrying(error: BaseException) -> bool:
    """Broken connections and server trouble are; a missing file or a refused request is not."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code in (408, 429) or error.code >= 500
    return not isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError))


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error) or type(error).__name__


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Building models from the registry.


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in the usual (sorted WordNet id) order, from torchvision's
    weight metadata, which ships inside torchvision (no download)."""
    return list(_imagenet_class_names())


@lru_cache(maxsize=1)
def _imagenet_class_names() -> tuple[str, ...]:
    from torchvision.models import ResNet50_Weights  # imported here: torchvision.models is slow to import

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def load_pretrained(name: str, tag: str, **overrides: Any) -> MlpMixer:
    """The model `name` ('B/16', 'Mixer-B_16', 'mixer_b16_224', ...) with the published weights `tag`.

    Downloads the checkpoint once (see `download`); `overrides` go to `load_checkpoint` (a different
    `num_classes` gives a new zero head, ready for fine-tuning). 1000-class models get the ImageNet
    class names as `model.class_names`. The model takes pixels in [-1, 1], as every model here: weights
    trained on another normalisation (the MIIL ones) get it folded into their stem.
    """
    entry = find_weights(name, tag)
    size = name_img_size(name)
    if size is not None and size != 224:
        raise ValueError(
            f"The published weights of Mixer-{entry.variant} are for 224×224 images, not {size}×{size}; "
            "load them at 224, then convert with mlpmixer.resize_to(model, size)."
        )
    path = download(entry.url, entry.sha256)
    cached = _local_path(entry.url) is None
    # The head is the file's until the checks and class names below; a new one, if asked for, comes last.
    num_classes = overrides.pop("num_classes", None)
    try:
        model = load_checkpoint(path, **overrides)
    except CheckpointError as e:
        if not cached or not path.is_file() or _readable(path):  # (an override that does not fit: the file is whole)
            raise
        # Cut short without an announced size (which is then not checked), or damaged since: not used again.
        path.unlink()
        raise CheckpointError(f"{e.args[0].rstrip('.')}; this cached download of {entry.url} was deleted, so the "
                              "next attempt downloads it again.") from None
    # A local file is read where it is, the user's own copy: deleting it, as a cached download may be, would lose it.
    if cached:
        source = f"{entry.url} (cached at {path})"
        fix = ("delete the cached file, which is then downloaded again, or fix the address registered for these "
               "weights (register_weights)")
    else:
        source = f"The local file {path}"
        fix = "register it under the variant and classes it holds (register_weights), or register the file you meant"
    found = paper_variant_of(model.config)
    if found != entry.variant:
        raise ValueError(f"{source} holds a {model.config.describe()}, not the registered Mixer-{entry.variant}; "
                         f"{fix}.")
    if entry.num_classes not in (None, model.num_classes):
        raise ValueError(f"{source} has {model.num_classes} classes, not the registered {entry.num_classes}; {fix}.")
    if model.class_names is None and model.num_classes == 1000:
        model.class_names = imagenet_class_names()
    if (entry.mean, entry.std) != GOOGLE_NORM:
        fold_input_normalisation(model, entry.mean, entry.std)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)  # a new zero-initialised head, whose classes have no names yet
    return model


def _readable(path: Path) -> bool:
    """Whether the checkpoint file at `path` reads whole (its weights and configuration, no overrides)."""
    try:
        read_checkpoint(path)
    except CheckpointError:
        return False
    return True


def fold_input_normalisation(model: MlpMixer, mean: Sequence[float], std: Sequence[float]) -> None:
    """Make a model trained on pixels normalised as (p/255 - mean) / std take this library's input,
    p/127.5 - 1 (SPEC §4), by changing its stem in place.

    Every pipeline here feeds [-1, 1], so weights trained on another range (the MIIL ones: [0, 1]) would
    see the wrong pixels. The stem is linear in its input: with u = v·0.5/std + (0.5 - mean)/std for
    v in [-1, 1], W·u + b = (W·0.5/std)·v + (b + W·(0.5 - mean)/std), computed in float64. The logits
    equal the original model's on the original inputs to float rounding.
    """
    proj = model.stem.proj
    if len(mean) != proj.in_channels or len(std) != proj.in_channels or not all(std):
        raise ValueError(f"The input normalisation (mean {tuple(mean)}, std {tuple(std)}) does not fit a model of "
                         f"{proj.in_channels} input channels; give one mean and one non-zero std per channel.")
    mean64, std64 = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    w = proj.weight.detach().double()
    scale, shift = (0.5 / std64).view(1, -1, 1, 1), ((0.5 - mean64) / std64).view(1, -1, 1, 1)
    with torch.no_grad():
        proj.bias.copy_(proj.bias.double() + (w * shift).sum((1, 2, 3)))
        proj.weight.copy_(w * scale)
