"""Image folders and WebDataset shards as training and evaluation data.

`open_folder_or_shards(path, split, holdout, seed, transform)` recognises

- a folder with `train/` and `val/` sub-folders: `split` picks one, which may itself be any of the below;
- a folder, a single shard, a glob (`shards/*.tar`) or a brace list (`train-{000..009}.tar.gz`) of
  WebDataset shards (`.tar`, `.tar.gz`, `.tgz`; members KEY.jpg|png + KEY.cls), with an optional
  `dataset.json` next to them naming the classes ({"classes": [...], "splits": {"train": count}});
- a folder of class sub-folders (ImageFolder's layout and order; found by `_image_folder`).

A folder is used whole whatever its split is called. With `holdout` > 0 (and no `train/` + `val/` pair),
every image falls on the "val" side when a seeded hash of its key (shards) or relative path (folders)
lands in the hold-out fraction, and on the "train" side otherwise: the two never overlap and the split
does not depend on worker, rank or file order.

Images are decoded inside the dataset, so in the DataLoader workers. An image that cannot be decoded
(or a shard sample without a usable label) is skipped with a warning and counted, once, in the dataset's
`bad_samples` (a `BadSampleCounter` shared by all DataLoader workers of one process); when more than 1% of
the images seen are bad, the dataset raises `BadDataError`. Folders are map-style datasets (use any
sampler); shards are iterable datasets that shuffle and split themselves: call `dataset.set_epoch(epoch)`
before each epoch, as with DistributedSampler, to get a new order. `read_into_memory` decodes a folder or
shards once into one uint8 tensor instead, for training that augments whole batches on the device
(`--augment-on device`).
"""

from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import random
import re
import stat
import tarfile
import warnings
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

# torchvision 0.29 deprecates its decoders in favour of TorchCodec (no dependency here); they are kept while they
# exist, 1.7x (500 px JPEG) to 4x (32 px) faster than PIL here. Python hides the warning outside __main__.
try:  # where they are gone, PIL decodes all
    from torchvision.io import ImageReadMode, decode_image
except ImportError:
    decode_image = None

from .data import Source, TensorData, holdout_too_large, worker_deaths
from .seeds import derive_seed

Transform = Optional[Callable[[torch.Tensor], Any]]
T = TypeVar("T")

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")  # the extensions of a shard sample's image
# The image files of a folder: torchvision's ImageFolder list, and GIF, which it leaves out without a word
# though `decode_image_bytes` (and `mixer predict`) read it.
FOLDER_IMAGES = (*IMG_EXTENSIONS, ".gif")
SPLITS = ("train", "val")
MAX_BAD_FRACTION = 0.01
# The bad fraction is judged once an epoch's worth of images, or this many, have been seen: early on
# it says little (two bad images among the first hundred of a set with 0.5% bad ones).
BAD_WINDOW = 10_000
SHUFFLE_BUFFER = 1000  # encoded samples held per worker for shuffling shards

# The folders of shards already said to have no dataset.json naming the classes: a run opens each side of a
# hold-out (and may count its images first), and is told once.
_UNNAMED_SAID: set[str] = set()
# Sub-folders named like splits that are not the train/ + val/ pair, and the folders already warned of them.
OTHER_SPLIT_NAMES = ("test", "valid", "validation")
_SPLIT_NAMES_SAID: set[str] = set()

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class BadDataError(ValueError):
    """Too many images of a dataset cannot be decoded."""

    def __init__(self, message: str) -> None:
        # A DataLoader re-raises a worker's exception as type(exc)(text with the worker's traceback);
        # keep only the sentence after the exception's name so the CLI still prints one sentence.
        super().__init__(message.rsplit(f"{type(self).__name__}: ", 1)[-1].strip())
        # The bad images it counts ("4 of 300 images ..."), for training's last metrics line: the text is all that
        # crosses from a worker, and the shared counter may have moved on since (other workers decode on).
        counted = re.match(r"(\d+) of \d+ ", str(self))
        self.bad = int(counted[1]) if counted else None


class BadLabel(ValueError):
    """A shard sample's .cls label is missing, not a number, or not one of the classes."""


class UnknownPixelRange(ValueError):
    """An image whose pixel values have no range the file states (32-bit integer or floating-point greyscale)."""


class BadSampleCounter:
    """How many images were decoded (`seen`) and how many of them failed (`bad`; some perhaps for their
    shard sample's label rather than the image), for the whole run.

    The counts live in shared memory, so DataLoader worker processes (which receive the dataset when
    they start) add to the counts the main process reads. They cover one process: each DDP rank
    counts its own images (and checks after its share of the window, `share`). `record` raises BadDataError once `window` images have been seen and more
    than 1% of them were bad.
    """

    def __init__(self, window: Optional[int]) -> None:
        self.window = min(window or BAD_WINDOW, BAD_WINDOW)
        # The data counted, for the sentence that stops the run (`open_folder_or_shards` names it): training and
        # evaluation data (or a hold-out's two sides) warn on the same terminal, and a bare "4 of 14" was neither's.
        self.data = ""  # " of PATH"
        self._seen = multiprocessing.Value("q", 0)
        self._bad = multiprocessing.Value("q", 0)
        self._bad_labels = multiprocessing.Value("q", 0)

    @property
    def seen(self) -> int:
        return self._seen.value

    @property
    def bad(self) -> int:
        return self._bad.value

    @property
    def bad_labels(self) -> int:
        """How many of the bad samples were bad for their shard label."""
        return self._bad_labels.value

    def what_was_bad(self) -> str:
        """The bad samples in words, after "4 of 300 images that": bad labels are named as such, as they are
        fixed in the .cls members or dataset.json, not the images."""
        bad, labels = self.bad, self.bad_labels
        if not labels:
            return "could not be decoded"
        if labels == bad:
            return "have a missing label or one that is not a class of the data"
        return f"are bad ({labels} for their label, {bad - labels} for an image that could not be decoded)"

    def share(self, processes: int) -> None:
        """Check once this process has seen its share of the window: each of `processes` training processes reads
        1/`processes` of every epoch and counts its own images, so the whole window came `processes` epochs late,
        or, for more than 5,000 images an epoch over 2 processes, never (a run on bad data ended "Done")."""
        self.window = (self.window + processes - 1) // processes

    def record(self, ok: bool, bad_label: bool = False) -> None:
        with self._seen.get_lock():
            self._seen.value += 1
        if not ok:
            with self._bad.get_lock():
                self._bad.value += 1
        if bad_label:
            with self._bad_labels.get_lock():
                self._bad_labels.value += 1
        seen, bad, labels = self.seen, self.bad, self.bad_labels
        if seen >= self.window and bad > MAX_BAD_FRACTION * seen:
            share = f"{bad} of {seen} {'samples' if labels else 'images'} ({100 * bad / seen:.1f}%){self.data}"
            what = self.what_was_bad()
            # Where they are fixed is said too: a dataset.json naming too few classes makes bad labels of the rest.
            fix = ("fix the .cls labels or name every class they use in dataset.json, or rebuild the data" if labels
                   else "check or rebuild the data")
            raise BadDataError(f"{share} {what}, more than the {100 * MAX_BAD_FRACTION:g}% allowed; {fix} (the "
                               "warnings name the bad files).")


def read_image_file(path: str | os.PathLike) -> bytes:
    """The bytes of the file at `path`; OSError (in a few words) unless it is a regular file: opened without
    waiting, as a named pipe with an image's name would otherwise block the reader for ever."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("not a regular file (a pipe, socket or device) but named as an image")
        return f.read()


def decode_image_bytes(data: bytes) -> torch.Tensor:
    """An encoded image -> uint8 (C, H, W), C = 1 for greyscale images and 3 otherwise: upright (turned as its
    EXIF orientation says, as photo viewers show it) and with transparent pixels composited over white (the
    colour hidden under them is arbitrary: often black, which made black line art on a transparent
    background a black square). ValueError, in a few words, when the data is no readable image."""
    if not data:  # said plainly: torch.frombuffer's complaint about a zero buffer length names no file problem
        raise ValueError("empty file")
    try:
        return _decode(data)
    except UnknownPixelRange:  # said as it is, not as a damaged image
        raise
    except UnidentifiedImageError:  # PIL's message names an io.BytesIO object, not the file
        raise ValueError("not an image, or in a format PIL cannot read") from None
    except Image.DecompressionBombError as e:  # whole, but larger than PIL decodes: not "damaged or truncated"
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else "its size"
        raise ValueError(f"too large: {size}, more than PIL decodes (twice PIL.Image.MAX_IMAGE_PIXELS, its guard "
                         "against decompression bombs)") from None
    except (RuntimeError, OSError, SyntaxError, ValueError, EOFError) as e:
        # torchvision's messages start with its C++ function and source line: "decode_jpeg, .../decode_jpeg.cpp:171, "
        reason = re.sub(r"^.*?\.cpp:\d+, ", "", str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise ValueError(f"damaged or truncated image: {reason.rstrip('.')}") from None


def _decode(data: bytes) -> torch.Tensor:
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    # JPEG and 8-bit opaque PNG go to torchvision's decoders, about 3x faster here than PIL plus conversion
    # (torchvision 0.19 decodes no 16-bit PNG). The PNG bit depth and colour type (bytes 24 and 25 of the
    # header; type 0 grey, 4 grey + alpha, 6 RGB + alpha) are read by hand because asking PIL for the mode
    # costs as much as decoding a 32x32 JPEG; UNCHANGED would give palette indices. Transparency (an alpha
    # channel, or a tRNS chunk, which comes before the image data) goes to PIL, to be composited: torchvision's
    # RGB_ALPHA made a quarter of an opaque palette PNG's pixels transparent.
    if (decode_image is not None and data.startswith(_PNG_MAGIC) and len(data) > 25 and data[24] <= 8 and data[25] not in (4, 6)
            and b"tRNS" not in data[:data.find(b"IDAT")]):
        return decode_image(buffer, ImageReadMode.GRAY if data[25] == 0 else ImageReadMode.RGB,
                            apply_exif_orientation=True)
    if decode_image is not None and data.startswith(_JPEG_MAGIC):
        image = decode_image(buffer, ImageReadMode.UNCHANGED, apply_exif_orientation=True)  # 1, 3 or 4 (CMYK)
        if image.shape[0] == 4:
            image = decode_image(buffer, ImageReadMode.RGB, apply_exif_orientation=True)
        return image
    # WebP, GIF (its first frame), BMP, TIFF, ..., images with transparency, and every format without torchvision
    with warnings.catch_warnings():
        # PIL warns of an image past its MAX_IMAGE_PIXELS and decodes it all the same, as torchvision decodes a JPEG
        # or PNG of any size without a word: a line naming no file, from each DataLoader worker. Past twice the
        # limit PIL refuses it, and the image is a bad sample, named ("too large").
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as pil:
            check_pixel_range(pil)  # on the file's image: a turned copy has neither its format nor its tags
            sixteen_bit = is_16_bit(pil)
            upright = ImageOps.exif_transpose(pil)
            if sixteen_bit:
                return torch.from_numpy(top_8_bits(upright))[None]
            grey = upright.mode in ("1", "L", "LA", "La", "F")
            if upright.has_transparency_data:
                white = Image.new("RGBA", upright.size, "white")
                upright = Image.alpha_composite(white, upright.convert("RGBA"))
            return F.pil_to_tensor(upright.convert("L" if grey else "RGB"))


def is_16_bit(pil: Image.Image) -> bool:
    """Whether a PIL image is 16-bit greyscale, which convert("L") clips to 255: mode I;16, or mode I (32-bit
    integers) from a format whose mode I holds 16-bit values (PIL scales a PGM's maximum to 65,535) or a
    TIFF of 16 bits a sample."""
    if pil.mode.startswith("I;16"):
        return True
    if pil.mode != "I":
        return False
    if pil.format in ("PNG", "PPM"):
        return True
    return pil.format == "TIFF" and tuple(pil.tag_v2.get(258, ())) == (16,)  # BitsPerSample


def check_pixel_range(pil: Image.Image) -> None:
    """UnknownPixelRange for greyscale whose values have no range the file states: 32-bit integers (a TIFF's
    1,260,000 would read as white, their top 8 bits as black) or floating point (0-1 or 0-255 alike)."""
    if pil.mode == "F" or (pil.mode == "I" and not is_16_bit(pil)):
        kind = "floating-point" if pil.mode == "F" else "32-bit integer"
        low, high = (f"{v:g}" if pil.mode == "F" else f"{v:,}" for v in pil.getextrema())
        raise UnknownPixelRange(f"{kind} greyscale (values {low} to {high}), whose range of values the file "
                                "does not state; convert it to 8- or 16-bit greyscale")


def top_8_bits(pil: Image.Image) -> np.ndarray:
    """A 16-bit greyscale PIL image as uint8 (H, W): the top 8 bits of each value."""
    return (np.asarray(pil).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)


def _load_counted(where: str, counter: BadSampleCounter, load: Callable[[], T]) -> Optional[T]:
    """`load()`, or None with a warning when it fails (a missing, truncated or undecodable image, a
    missing or wrong label); either way counted."""
    try:
        item: Optional[T] = load()
    except Exception as e:  # any failure means a bad sample, whatever the decoder raises
        warnings.warn(f"Skipping {where}: {str(e).splitlines()[0] or type(e).__name__}.", stacklevel=2)
        counter.record(ok=False, bad_label=isinstance(e, BadLabel))
        return None
    counter.record(ok=True)
    return item


def _holdout_rank(key: str, seed: int) -> int:
    """A stable 32-bit hash of a sample's name (not Python's salted hash()), so every process and run agrees.
    The name's bytes as the file system holds them: a file name that is not UTF-8 has no UTF-8 encoding.
    A cryptographic hash, not a checksum: CRC-32 is linear in the name's bits, so a hold-out of numbered
    names followed their digits (of sample00000-sample00999, a tenth held out 81 odd numbers and 28 even,
    and none ending in 0, 4 or 8: no image of three classes where the labels cycle through ten)."""
    return int.from_bytes(hashlib.blake2b(os.fsencode(f"{seed}/{key}"), digest_size=4).digest(), "big")


def in_holdout(key: str, holdout: float, seed: int) -> bool:
    """Whether the shard sample named `key` belongs to the hold-out ("val") part: a share `holdout` of
    the samples on average, to 2^-32 (a hold-out of 10 among CIFAR-10's 50,000 holds out about 10).
    Streamed shards can do no better than chance; folders hold out an exact count (`_open_image_folder`)."""
    return _holdout_rank(key, seed) < holdout * 2**32


def is_split_pair(path: str) -> bool:
    """Whether `path` is a folder with `train/` and `val/` sub-folders, which are the two splits."""
    return (Path(path) / "train").is_dir() and (Path(path) / "val").is_dir()


class NumberedClasses(list):
    """The class names of shards without a dataset.json naming them: their .cls numbers ("0", "1", ...), marked
    as such for `check_same_classes`, which then says where names would come from."""


def check_same_classes(train_names: list[str], eval_names: list[str], evaluated: str = "the evaluation data",
                       reference: str = "the training data") -> None:
    """Raise ValueError when evaluation data names other classes (or another order) than training data;
    `evaluated` and `reference` name the two in the message."""
    if list(train_names) == list(eval_names):
        return
    if len(train_names) != len(eval_names):
        missing = [n for n in train_names if n not in set(eval_names)]
        extra = [n for n in eval_names if n not in set(train_names)]

        def listed(names: list[str]) -> str:
            return ", ".join(map(repr, names[:5])) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

        detail = f"{len(eval_names)} classes instead of {len(train_names)}" + "".join(
            f"; {which} {listed(names)}" for which, names in (("without", missing), ("with", extra)) if names)
    else:
        i = next(i for i, (a, b) in enumerate(zip(train_names, eval_names)) if a != b)
        detail = f"class {i} is {eval_names[i]!r} instead of {train_names[i]!r}"
    # Only shards name their classes by number for want of names: MNIST's classes are "0".."9" by rights.
    numbered = isinstance(eval_names, NumberedClasses) or isinstance(train_names, NumberedClasses)
    hint = (" (shards without a dataset.json name their classes by number: put one with the class names "
            "next to them)" if numbered else "")
    raise ValueError(
        f"The classes of {evaluated} differ from those of {reference} ({detail}); give both the same classes "
        f"in the same order{hint}."
    )


def warn_nothing_to_evaluate(holder: str, stacklevel: int = 2) -> None:
    """The warning for an evaluation class without images: `holder` (what should have held them) "holds no
    images: its class has nothing to evaluate." Its accuracy would be NaN (`reports.per_class_accuracy`)."""
    warnings.warn(f"{holder} holds no images: its class has nothing to evaluate.", stacklevel=stacklevel + 1)


class SharedNames:
    """A set of sample names that DataLoader workers share, as the counts of BadSampleCounter are: 64-bit
    hashes in shared memory, `room` of them at most (more are not kept)."""

    def __init__(self, room: int) -> None:
        self._hashes = multiprocessing.Array("q", room)
        self._size = multiprocessing.Value("i", 0)

    @staticmethod
    def _hash(name: str) -> int:
        return int.from_bytes(hashlib.blake2b(os.fsencode(name), digest_size=8).digest(), "little", signed=True)

    def __contains__(self, name: str) -> bool:
        size = self._size.value
        return size > 0 and self._hash(name) in self._hashes[:size]  # no hashing while the set is empty

    def add(self, name: str) -> None:
        with self._size.get_lock():
            if self._size.value < len(self._hashes):
                self._hashes[self._size.value] = self._hash(name)
                self._size.value += 1


class FolderDataset(torch.utils.data.Dataset):
    """(path, label) pairs of an image folder; yields (transform(image), label).

    A bad image is warned about and counted, and then skipped: it yields None, which `drop_bad` takes
    out of the batch (evaluation counts each good image once). With `replace_bad` (training) it is
    replaced by the next good image instead, so a batch keeps its size and the samplers, which place
    every step's images for resuming, need not know.

    Each bad file is warned about and counted once: the images found bad are marked in shared memory
    (seen by every worker, as the counts are) and passed over in later epochs. Counted again on every
    visit, one bad file among 116 (0.9%) read as 2 of 173 images (1.2%) early in the second epoch."""

    def __init__(self, samples: list[tuple[str, int]], transform: Transform, replace_bad: bool = False) -> None:
        self.samples = samples
        self.transform = transform
        self.replace_bad = replace_bad
        self.bad_samples = BadSampleCounter(len(samples))
        self._found_bad = multiprocessing.Array("b", len(samples), lock=False)  # one flag per image

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Optional[tuple[Any, int]]:
        for offset in range(len(self.samples) if self.replace_bad else 1):
            i = (index + offset) % len(self.samples)
            if self._found_bad[i]:
                continue
            path, label = self.samples[i]
            image = _load_counted(path, self.bad_samples, lambda: decode_image_bytes(read_image_file(path)))
            if image is None:
                self._found_bad[i] = 1
            else:
                return (self.transform(image) if self.transform else image), label
        if not self.replace_bad:
            return None
        raise BadDataError(f"None of the {len(self.samples)} images could be decoded.")


def drop_bad(batch: list[Optional[tuple[Any, int]]]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """DataLoader collation that leaves out the images a FolderDataset skipped; None if all were."""
    good = [item for item in batch if item is not None]
    return torch.utils.data.default_collate(good) if good else None


class ShardDataset(torch.utils.data.IterableDataset):
    """WebDataset shards streamed with `webdataset`; yields (transform(image), label) for the `split`
    side of a `holdout` (all samples when 0).

    Each epoch (see `set_epoch`) the shards are shuffled with (seed, epoch), identically in every
    process, then dealt out to the DDP ranks (torch.distributed, or RANK/WORLD_SIZE; not the "val" split, which
    rank 0 evaluates whole) and within a rank
    to the DataLoader workers, so each sample is read once per epoch. With fewer shards than readers
    (ranks × workers), every reader reads every shard and keeps every (ranks × workers)-th sample
    instead. Training data is also shuffled through a buffer. Ranks get different numbers of samples
    when the shards do not divide evenly.

    `counted_in`: where `num_examples` is dataset.json's count, what it says (the file, the count), for the
    warning given once, by the first reader to find that the shards hold more samples.

    Set `keyed` to get (transform(image), label, name) items instead, the name being "shard:key": the order
    in which a DataLoader's workers interleave their samples depends on their number, the names' does not.
    """

    def __init__(
        self,
        shards: list[str],
        transform: Transform,
        num_classes: int,
        num_examples: Optional[int] = None,
        *,
        split: str = "train",
        holdout: float = 0.0,
        seed: int = 0,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        whole: bool = False,
        counted_in: Optional[str] = None,
    ) -> None:
        self.shards = shards
        self.transform = transform
        self.num_classes = num_classes
        self.split = split
        self.holdout = holdout
        self.seed = seed
        # `whole`: every process reads all of the split in shard order, to hold it in memory.
        self.whole = whole
        self.shuffle = split == "train" and not whole
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.keyed = False
        self.bad_samples = BadSampleCounter(num_examples)
        # As in FolderDataset, each bad sample is warned about and counted once, then passed over: counted on
        # every pass, one bad image among 150 (0.7%) read as 2 of 151 (1.3%) where it came first in the second
        # pass, which stopped the run. Room for the 1% of the samples that may be bad, and for every sample of
        # the window the bad fraction is first judged on: an epoch of whole batches ends a little before its
        # pass does, so the window fills early in the next pass, where a bad sample left out of a smaller set
        # was counted again (3 bad of 172 stopped a run as "4 of 172"). Beyond the room (only where more than
        # 1% of the samples are bad, which stops the run), a bad sample is counted again on each pass.
        room = max(int(MAX_BAD_FRACTION * (num_examples or BAD_WINDOW)) + 1, self.bad_samples.window)
        self._found_bad = SharedNames(room)
        # The count ends training's epochs, so samples beyond it would be left out of each without a word. Not
        # counted at the start, which would read every shard: each reader, as it reads, records the most samples
        # read from each shard by any reader of this process (`_held`, totalled in `_held_total`).
        self.num_examples, self.counted_in = num_examples, counted_in
        self._held = multiprocessing.Array("q", len(shards), lock=False)
        self._held_total = multiprocessing.Value("q", 0)  # its lock guards `_held` and `_said` too
        self._said = multiprocessing.Value("b", 0, lock=False)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_part(self) -> tuple[list[str], int, int]:
        """The shards this reader (rank and worker) reads, and the share of their samples it keeps:
        every `stride`-th one from `offset`."""
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        # Validation data are read whole by every process that reads them: only rank 0 evaluates, and dealt
        # out to the ranks it scored its share alone (half of a hold-out in 2 processes; none of one shard's).
        if self.whole or self.split == "val":
            rank, world_size = 0, 1
        shards = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch}").shuffle(shards)
        readers = world_size * num_workers
        if len(shards) < readers:
            # Dealing out shards would leave readers idle (CIFAR-10's 5 shards, 16 workers). Reading a
            # shard's tar members costs more than decoding its images (CIFAR-10: 151 against 58 µs a
            # sample, this project's CPU) but far less than decoding and augmenting them, which each
            # reader does only for its share. (`read_into_memory`, which only decodes, deals out shards.)
            return shards, readers, rank * num_workers + worker
        # Ranks first, so they get equal numbers of shards (within one); a rank's workers share its own.
        return shards[rank::world_size][worker::num_workers], 1, 0

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        # Shards are split and shuffled above, by epoch; webdataset reads them and shuffles samples.
        shards, stride, offset = self._my_part()
        stages = _shard_reading(shards)
        if self.counted_in is not None:
            stages.append(self._held_counted)
        if stride > 1:
            stages.append(lambda samples: itertools.islice(samples, offset, None, stride))
        if self.holdout > 0:
            val = self.split == "val"
            keep = lambda sample: in_holdout(sample["__key__"], self.holdout, self.seed) == val  # noqa: E731
            stages.append(wds.select(keep))
        if self.shuffle:
            rng = random.Random(f"{self.seed}/{self.epoch}/{rank}/{worker}")
            stages.append(wds.shuffle(self.shuffle_buffer, rng=rng))
        for n, sample in enumerate(wds.DataPipeline(*stages)):
            where = f"{sample.get('__url__')}:{sample['__key__']}"
            if where in self._found_bad:
                continue
            if self.shuffle:  # training: the n-th sample's augmentation draws follow from where it is read
                torch.default_generator.manual_seed(derive_seed(self.seed, 3, self.epoch, rank, worker, n))
            item = _load_counted(where, self.bad_samples, lambda: self._decode(sample))
            if item is None:
                self._found_bad.add(where)
            else:
                image, label = item
                image = self.transform(image) if self.transform else image
                yield (image, label, where) if self.keyed else (image, label)

    def _held_counted(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """`samples`, counted shard by shard into `_held`; once the shards are found to hold more samples than
        counted, a warning saying so, once for all readers of this process."""
        index = {url: i for i, url in enumerate(self.shards)}
        url, read = None, 0
        for sample in samples:
            if sample["__url__"] != url:
                url, read = sample["__url__"], 0
            read += 1
            with self._held_total.get_lock():
                i = index[url]
                if read > self._held[i]:
                    self._held_total.value += read - self._held[i]
                    self._held[i] = read
                found = self._held_total.value
                over = found > self.num_examples and not self._said.value
                if over:
                    self._said.value = 1
            if over:
                warnings.warn(f"{self.counted_in}, but the shards hold more (at least {found}): training ends each "
                              "epoch after the count, leaving the others out; correct the count in its \"splits\" "
                              "(or remove it and train with --steps).")
            yield sample

    def _decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """A sample's image and class; ValueError when either is missing or wrong."""
        data = next((sample[ext] for ext in IMAGE_MEMBERS if ext in sample), None)
        if data is None:
            raise ValueError(f"no {'/'.join(IMAGE_MEMBERS)} image")
        label = _label(sample)
        if not 0 <= label < self.num_classes:
            raise BadLabel(f"its .cls label {label} is not one of the {self.num_classes} classes")
        return decode_image_bytes(data), label


def _label(sample: dict[str, Any]) -> int:
    """A shard sample's class number, from its .cls member (int() takes the ASCII bytes of "3\n");
    BadLabel when it has none or it is not a whole number."""
    text = sample.get("cls")
    if text is None:
        raise BadLabel("it has no .cls label")
    try:
        return int(text)
    except ValueError:
        raise BadLabel(f"its .cls label {text[:20].decode(errors='replace')!r} is not a class number") from None


def _list_shards(path: str) -> list[str]:
    """The shard files that a folder, a file, a glob or a brace list names, sorted; [] when none."""
    if os.path.isdir(path):
        names = [str(p) for p in Path(path).iterdir()]
    else:
        patterns = list(braceexpand(path))
        missing = [p for p in patterns if not any(c in p for c in "*?[") and not os.path.exists(p)]
        if len(patterns) > 1 and missing:
            raise FileNotFoundError(f"Shard {missing[0]} does not exist; check the list of shards.")
        names = [name for pattern in patterns for name in glob.glob(pattern)]
    return sorted({name for name in names if name.endswith(SHARD_SUFFIXES) and os.path.isfile(name)})


def _read_dataset_json(folder: Path) -> Optional[dict[str, Any]]:
    path = folder / "dataset.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
        # A string would pass for a list of one-letter classes, and a count in quotes fail later.
        if not isinstance(info.get("classes", []), list):
            raise ValueError(f'"classes" must be a list of names, not {info["classes"]!r}')
        # An empty list made every sample's label bad, and the shards read as having no .cls labels at all.
        if info.get("classes") == []:
            raise ValueError('"classes" is empty: name the classes, or leave "classes" out to number them')
        # The names travel into the model: `mixer predict` would answer one name for two classes, and a report
        # keyed by name would merge them.
        repeated = [name for name, count in Counter(map(str, info.get("classes", []))).items() if count > 1]
        if repeated:
            raise ValueError(f'"classes" names {repeated[0]!r} more than once: give each class its own name '
                             '(ImageNet\'s two "crane"s as "crane (bird)" and "crane (machine)", say)')
        splits = info.get("splits", {})
        if not isinstance(splits, dict) or not all(type(n) is int and n >= 0 for n in splits.values()):
            raise ValueError(f'"splits" must map each split to a whole number of images, not {splits!r}')
    except ValueError as e:
        raise ValueError(f"{path} is not a valid dataset description ({e}); fix it or remove it.") from None
    return info


def _shard_reading(shards: list[str]) -> list:
    """The webdataset stages that read the samples of `shards` in order; a shard that cannot be read stops
    the run with BadDataError naming it (a truncated download, a damaged gzip stream).

    webdataset's `tarfile_to_samples`, with our opener in place of its `url_opener`: tarfile reads a
    compressed shard with zlib alone and takes a stream that ends between two members for the archive's
    end, so a shard cut there would read as a shorter one, silently. Python's gzip module checks that
    the stream ends where it should (and its CRC); a plain .tar must end with tar's two zero blocks."""
    expand = functools.partial(wds.tariterators.tar_file_expander, handler=_unreadable_shard)
    group = functools.partial(wds.tariterators.group_by_keys, handler=_unreadable_shard)
    return [wds.SimpleShardList(shards), _open_shard_files, expand, group]


def _open_shard_files(sources: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for source in sources:
        url = source["url"]
        try:
            if url.endswith((".gz", ".tgz")):
                stream = gzip.open(url, "rb")
            else:
                with open(url, "rb") as f:  # tar ends with two zero blocks of 512 bytes
                    f.seek(max(os.path.getsize(url) - 1024, 0))
                    if f.read() != bytes(1024):
                        raise tarfile.ReadError("no end-of-archive blocks")
                stream = open(url, "rb")
        except (OSError, tarfile.TarError) as exn:
            exn.args = (*exn.args, None, url)  # as webdataset's opener does, so that the handler names the shard
            _unreadable_shard(exn)  # raises BadDataError
        # Closed here, once the shard is read or its reading abandoned: webdataset's reader leaves it open,
        # to the garbage collector ("ResourceWarning: unclosed file").
        try:
            yield {**source, "stream": stream}
        finally:
            stream.close()


def _unreadable_shard(exn: Exception) -> bool:
    """webdataset's error handler: it is called once where a member fails, then again by the shard's reader,
    which appends (stream, url) to the exception's arguments; the second call names the shard."""
    url = exn.args[-1] if len(exn.args) >= 3 and isinstance(exn.args[-1], str) else None
    if url is None or not isinstance(exn, (tarfile.TarError, EOFError, OSError, zlib.error)):
        raise exn
    reason = str(exn.args[0]).split(" @ ")[0]  # webdataset appends " @ <stream>" to the message
    raise BadDataError(f"Shard {url} cannot be read ({reason}): it is truncated or damaged; "
                       "copy or build it again, or leave it out of --data.") from None


def _scan(shards: list[str], split: str, holdout: float, seed: int,
          num_classes: Optional[int]) -> tuple[int, dict[int, str]]:
    """Every sample's key and .cls member read, no image decoded: the number of samples on the `split` side
    of the hold-out, and the labels found, each with a sample that has it. A sample whose label is missing,
    not a number or not one of `num_classes` (where known) is left out of both: reading it for training or
    evaluation skips it as a bad sample, with a warning naming it."""
    count, labels = 0, {}
    stream = wds.DataPipeline(*_shard_reading(shards))
    # disable=None: no bar where stderr is not a terminal (a log file would get a line per refresh).
    for sample in tqdm(stream, desc="counting samples", unit=" samples", leave=False, disable=None):
        try:
            label = _label(sample)
        except BadLabel:
            continue
        if label < 0 or (num_classes is not None and label >= num_classes):
            continue
        if label not in labels:
            labels[label] = f"{sample['__url__']}:{sample['__key__']}"
        if holdout == 0 or in_holdout(sample["__key__"], holdout, seed) == (split == "val"):
            count += 1
    return count, labels


def _numbered_classes(labels: dict[int, str], folder: Path) -> list[str]:
    """The classes of shards without a dataset.json, named by their numbers, which must run 0..n-1: a label
    beyond a gap (one sample labelled 99 among 0-9) would make classes of no images."""
    if not labels:
        raise ValueError(f"No sample of the shards in {folder} has a .cls class number; label them or put a "
                         "dataset.json naming the classes next to them.")
    gap = min(set(range(max(labels))) - labels.keys(), default=None)
    if gap is not None:
        above = min(label for label in labels if label > gap)
        skipped = f"{gap}" if above == gap + 1 else f"{gap} to {above - 1}"
        raise ValueError(f"The .cls labels of the shards in {folder} skip {skipped} ({labels[above]} is labelled "
                         f"{above}); put a dataset.json naming the classes next to them (samples labelled beyond "
                         "them are then skipped as bad) or fix the labels.")
    return NumberedClasses(str(i) for i in range(len(labels)))


def _open_shards(shards: list[str], split: str, holdout: float, seed: int, transform: Transform,
                 whole: bool = False) -> Source:
    folder = Path(shards[0]).parent
    info = _read_dataset_json(folder) or {}
    class_names = info.get("classes")
    total = sum(info.get("splits", {}).values()) or None
    counted_in = None  # what dataset.json says of the count, while it is the count used
    if total is not None:  # dataset.json counts the whole folder; estimate for the shards chosen
        counted_in = f"{folder / 'dataset.json'} counts {total} images"
        in_folder = len(_list_shards(str(folder)))
        total = round(total * len(shards) / in_folder)
        if len(shards) < in_folder:
            counted_in += f", {total} in proportion for the {len(shards)} of its {in_folder} shards read"
    if holdout > 0 and whole and class_names is not None:
        total = counted_in = None  # read whole into memory: counted as it is read, no need to scan first
    elif class_names is None or holdout > 0:
        # A hold-out's sides are only known sample by sample, and training needs the exact count to
        # know where an epoch ends; without dataset.json the classes are unknown too.
        if class_names is None and os.path.realpath(folder) not in _UNNAMED_SAID:
            _UNNAMED_SAID.add(os.path.realpath(folder))
            warnings.warn(
                f"No dataset.json with class names next to {shards[0]}; reading the shards to count the "
                "classes, which are named by their numbers.",
                stacklevel=3,
            )
        said, counted_in = counted_in, None
        total, labels = _scan(shards, split, holdout, seed, None if class_names is None else len(class_names))
        class_names = class_names or _numbered_classes(labels, folder)
        if holdout > 0 and total == 0:
            # A --holdout count is a share of what dataset.json counts (train.py): a count there far from the
            # shards' (a dataset.json copied from elsewhere) makes the share of a small count round to no image.
            counted = (f" ({said}; a --holdout count is taken as a share of that, so check that it counts these "
                       "shards)") if said else ""
            raise ValueError(f"A hold-out of {holdout:.4g} of the shards in {folder} leaves their {split} part "
                             f"empty{counted}; hold out more or fewer images (--holdout).")
    dataset = ShardDataset(shards, transform, len(class_names), total, split=split, holdout=holdout, seed=seed,
                           whole=whole, counted_in=counted_in)
    names = class_names if isinstance(class_names, NumberedClasses) else [str(name) for name in class_names]
    return Source(dataset, names, total)


def _image_folder(root: Path, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """The classes of an image folder (its sub-folders, sorted) and its (image path, label) pairs, in
    ImageFolder's order. Written here rather than taken from torchvision's ImageFolder because its walk
    follows every link with no loop check, and passes over folders it cannot read without a word.

    Hidden entries are left out, as `ls` and file managers leave them: a hidden folder is not a class
    (Jupyter's .ipynb_checkpoints would be one), nor a hidden file an image (macOS's ._NAME.jpg companions
    would count as undecodable images). Links are followed, to class folders, images and folders, except
    a link to a folder that leads into the data folder, into a folder read through another link, or to a
    folder holding one of them: through it, images would be read twice, under another class, or without
    end (`up -> ..` made 2,460 samples of 60 images); it is left out with a warning. A folder that cannot
    be read stops with one sentence, as does a class folder without images in training data ("train":
    a class that no image shows cannot be learnt); elsewhere that is a warning."""
    trees = [os.path.realpath(root)]  # the folders read, by real path: the data folder and the links' targets

    def followed(path: str) -> bool:
        if not os.path.islink(path):
            return True
        real = os.path.realpath(path)
        if any(os.path.commonpath([real, tree]) in (real, tree) for tree in trees):
            warnings.warn(f"Not following the link {path}: it leads back into the data ({real}), whose images "
                          "would be read twice.", stacklevel=3)
            return False
        trees.append(real)
        return True

    def unreadable(e: OSError) -> None:  # os.walk would pass over the folder and its images silently
        raise OSError(f"{e.filename} cannot be read ({e.strerror}); fix its permissions or move it out of the data.")

    entries = sorted(os.scandir(root), key=lambda e: e.name)  # sorted first: which link counts as first is fixed
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".") and followed(e.path)]
    samples = []
    for label, name in enumerate(classes):
        found = []
        for top, dirs, files in os.walk(root / name, followlinks=True, onerror=unreadable):
            dirs[:] = [d for d in dirs if not d.startswith(".") and followed(os.path.join(top, d))]
            images = [f for f in files if not f.startswith(".") and has_file_allowed_extension(f, FOLDER_IMAGES)]
            found += [(top, f) for f in images]
        if not found:
            folder = f"The class folder {root / name}"
            if split == "train":
                raise FileNotFoundError(f"{folder} holds no images; put its images in it or remove it (a class that no "
                                        "image shows cannot be learnt).")
            warn_nothing_to_evaluate(folder, stacklevel=3)
        samples += [(os.path.join(top, f), label) for top, f in sorted(found)]
    return classes, samples


def _open_image_folder(root: Path, split: str, holdout: float, seed: int, transform: Transform,
                       replace_bad: bool) -> Source:
    classes, samples = _image_folder(root, split)
    if not samples:
        raise FileNotFoundError(
            f"{root} has class folders but no images in them; put each class's images in its folder."
        )
    if holdout > 0:  # exactly round(holdout × images), the first in the order of a seeded stable hash
        count = round(holdout * len(samples))
        ranked = sorted(samples, key=lambda s: (_holdout_rank(Path(s[0]).relative_to(root).as_posix(), seed), s[0]))
        held = {path for path, _ in ranked[:count]}
        samples = [s for s in samples if (s[0] in held) == (split == "val")]
        if not samples:
            raise ValueError(
                f"Holding out {count} of the {len(ranked)} images of {root} leaves its {split} part empty; "
                f"hold out between 1 and {len(ranked) - 1} of them (--holdout)."
            )
    return Source(FolderDataset(samples, transform, replace_bad), classes, len(samples))


def holdout_share(path: str, holdout: float, seed: int) -> float:
    """A hold-out of the folder or shards `path` as the fraction of its images that the sources take: a count
    (>= 1, as the digits recipe gives) over the images it holds, a fraction as it is."""
    if holdout < 1:
        return holdout
    n = open_folder_or_shards(path, "train", 0.0, seed, None).num_examples
    if not n:
        raise ValueError(f"{path} does not say how many images it holds; give --holdout as a fraction.")
    if holdout >= n:
        raise holdout_too_large(holdout, n, path)
    return holdout / n


def open_folder_or_shards(path: str, split: str, holdout: float, seed: int, transform: Transform,
                          whole: bool = False, replace_bad: bool = False) -> Source:
    """Open an image folder or WebDataset shards as the `split` ("train" or "val") part of the data,
    holding out a seeded `holdout` fraction for "val" when no train/ + val/ pair is given (0: the
    whole folder, whatever the split). The dataset yields (transform(uint8 CHW tensor), int label).
    `whole`: shards are not split across processes nor shuffled (every process reads all of them).
    Bad images are skipped (shards) or yield None (folders: batch them with `drop_bad`), or with
    `replace_bad` a folder gives the next good image in their place (FolderDataset)."""
    if split not in SPLITS:
        raise ValueError(f"The split must be 'train' or 'val', not {split!r}.")
    if not 0 <= holdout < 1:
        raise ValueError(f"The hold-out fraction must be at least 0 and below 1, not {holdout}.")
    source = _open_folder_or_shards(path, split, holdout, seed, transform, whole, replace_bad)
    counter = getattr(source.dataset, "bad_samples", None)
    if counter is not None and not counter.data:  # (a train/ + val/ pair has named its folder)
        side = "" if holdout == 0 else "the hold-out of " if split == "val" else "the training part of "
        counter.data = f" of {side}{path}"
    return source


def _open_folder_or_shards(path: str, split: str, holdout: float, seed: int, transform: Transform, whole: bool,
                           replace_bad: bool) -> Source:
    shards = _list_shards(path)
    if shards:
        return _open_shards(shards, split, holdout, seed, transform, whole)
    root = Path(path)
    if not root.exists():
        what = "shards match" if any(c in path for c in "*?[{") else "file or folder matches"
        raise FileNotFoundError(f"No {what} {path}; check the path.")
    if not root.is_dir():
        raise ValueError(f"{path} is neither a folder nor a .tar/.tar.gz shard; give an image folder or shards.")
    if is_split_pair(path):
        return open_folder_or_shards(str(root / split), split, 0.0, seed, transform, whole, replace_bad)
    _warn_if_split_names(root)
    if not any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):  # hidden ones are no classes
        raise FileNotFoundError(
            f"{path} has neither class sub-folders nor .tar/.tar.gz shards; give an image folder or shards."
        )
    return _open_image_folder(root, split, holdout, seed, transform, replace_bad)


def _warn_if_split_names(root: Path) -> None:
    """Warn, once per folder, of a train/ sub-folder beside test/, valid/ or validation/ but no val/: only train/ +
    val/ are the two splits (a test set is not chosen for validating on without a word), so these are classes."""
    other = next((name for name in OTHER_SPLIT_NAMES if (root / name).is_dir()), None)
    if other is None or not (root / "train").is_dir() or os.path.realpath(root) in _SPLIT_NAMES_SAID:
        return
    _SPLIT_NAMES_SAID.add(os.path.realpath(root))
    warnings.warn(f"{root} has train/ and {other}/ sub-folders but no val/, so they are read as classes named "
                  f"\"train\" and \"{other}\"; rename {other}/ to val/ to train on train/ and validate on it.",
                  stacklevel=4)


def read_into_memory(path: str, split: str, holdout: float, seed: int, in_chans: int, workers: int = 2,
                     progress: bool = True) -> TensorData:
    """The `split` side of an image folder or shards, decoded once (in `workers` DataLoader workers) into
    one uint8 tensor with `in_chans` channels: for training that augments whole batches on the device
    (`batch_augment`). Bad images are skipped and counted as in training; every image must have one size."""
    from .transforms import to_channels

    source = open_folder_or_shards(path, split, holdout, seed, to_channels(in_chans), whole=True)
    if isinstance(source.dataset, ShardDataset):
        # One reader per shard at most: more would each read every shard (ShardDataset._my_part), and with
        # nothing to augment, reading the tar members is most of the work.
        workers = min(workers, len(source.dataset.shards))
    loader = torch.utils.data.DataLoader(source.dataset, batch_size=256, num_workers=workers, collate_fn=_pack)
    images: list[torch.Tensor] = []
    labels: list[int] = []
    with worker_deaths("rerun the command"), tqdm(total=source.num_examples, desc="decoding into memory", unit="img",
                                                 disable=None if progress else True, leave=False) as bar:
        for pixels, shapes, batch_labels in loader:
            sizes = shapes.prod(1).tolist()
            images += [flat.view(*shape) for flat, shape in zip(pixels.split(sizes), shapes.tolist())]
            labels += batch_labels.tolist()
            bar.update(len(batch_labels))
    if not images:
        raise ValueError(f"The {split} part of {path} holds no images that could be decoded; check the data.")
    sizes = sorted({tuple(image.shape[-2:]) for image in images})
    if len(sizes) > 1:
        shown = ", ".join(f"{h}×{w}" for h, w in sizes[:3]) + (", ..." if len(sizes) > 3 else "")
        raise ValueError(f"{path} holds images of {len(sizes)} sizes ({shown}); augmenting on the device needs "
                         "one size: resize the images or train with --augment-on workers.")
    counter = source.dataset.bad_samples
    if counter.bad:  # the workers warned about each; say it once here, where the user looks
        noun = "samples" if counter.bad_labels else "images"
        warnings.warn(f"Skipped {counter.bad} of {counter.seen} {noun} of {path} that {counter.what_was_bad()}.",
                      stacklevel=2)
    return TensorData(torch.stack(images), torch.tensor(labels, dtype=torch.int64), source.class_names, counter)


def _pack(batch: list[Optional[tuple[torch.Tensor, int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DataLoader collation for images of any sizes: (all pixels concatenated, (n, 3) shapes, labels).
    Three tensors per batch, as a worker passes each tensor to the main process through a file
    descriptor: one per image ran out of them."""
    good = [item for item in batch if item is not None]  # a folder's bad images yield None
    if not good:
        no_labels = torch.empty(0, dtype=torch.int64)
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, 3, dtype=torch.int64), no_labels
    images, labels = zip(*good)
    shapes = torch.tensor([image.shape for image in images], dtype=torch.int64)
    return torch.cat([image.reshape(-1) for image in images]), shapes, torch.tensor(labels, dtype=torch.int64)
