"""The training loop, in plain sight (one function, `train`).

Every random choice is a function of where it is made, not of how many draws came before it: the batch
order of each epoch comes from a generator seeded by (seed, epoch), dropout and mixup from a seed of
(seed, step), and augmentation from a seed of (seed, step) for in-memory data, of (seed, epoch, place)
for each image of a folder, of (seed, epoch, reader, n) for each sample of shards. So a run resumed from
a checkpoint of step k (model, optimiser, EMA and step saved; schedule and data position follow from
the step) ends with bit-for-bit the weights of an uninterrupted run on the CPU, whatever its data. The
same construction makes N processes (torchrun, or `launch`'s forked CPU processes) see exactly the images,
augmented the same way, that one process sees with the same global batch (each rank takes its slice of
it), for all data but shards, which are dealt out to the ranks by shard.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import importlib
import inspect
import json
import math
import multiprocessing
import os
import socket
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from tqdm import tqdm

from .bench import free_cores, slow_bf16
from .checkpoints import (STATE_DIR, atomic_write, check_writable_folder, first_line, load_checkpoint,
                          read_checkpoint, remove_temporaries, resolve_path, run_config, save_checkpoint, zip_damage)
from .cli import interrupt_behind, raise_if_stopped
from .compiled import CompiledOrEager
from .data import (MNIST5K, Source, TensorData, TensorDataset, augment_digits, holdout_split, holdout_too_large,
                   is_idx_folder, load_tensors, to_model_input, worker_deaths)
from .evaluate import evaluate, open_eval_data
from .model import MlpMixer, create_model
from .permute import FixedPermutation
from .profiling import StepProfiler
from .recipes import MAX_STEPS, Recipe
from .resize import resize_to
from .seeds import derive_seed, reseed
from .shared_grads import SharedGradients
from .variants import DEFAULT_IMG_SIZE, SHAPE_FIELDS, MixerConfig, as_pair, paper_variant_of, variant_config

if TYPE_CHECKING:  # imported where used: torchvision takes a second to import, the default job needs none of it
    from .batch_augment import BatchAugment

STATE_PATTERN = "step-{:08d}.pt"
# What to do when a DataLoader worker dies in training or its evaluations (data.worker_deaths).
RESUME_ADVICE = "the saved training states are kept: add --resume to go on"
_current_run: Optional[Path] = None  # the run folder this process's `train` is writing, for `_resume_hint`
DIVERGED_WAIT_S = 30  # how long the other ranks wait for rank 0's account of a NaN loss (_as_rank_0_says)


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite."""


class OutOfMemory(ValueError):
    """The GPU ran out of memory: a batch too large for it, said in one sentence with what to change."""


@dataclass
class RunFiles:
    out: Path
    model: Path
    config: Path
    metrics: Path
    curves: Path


def new_run_dir(root: str | Path = "runs") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = Path(root) / stamp, 1
    while path.exists():
        n += 1
        path = Path(root) / f"{stamp}-{n}"
    return path


def lr_at(step: int, total: int, r: Recipe) -> float:
    """Linear warm-up to r.lr, then cosine or linear decay towards r.min_lr, which step `total` would have: the
    last step run (total - 1) is one short of it, a little above min_lr (kept so: trained weights depend on it)."""
    warmup = int(r.warmup) if r.warmup >= 1 else round(r.warmup * total)
    if step < warmup:
        return r.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if r.schedule == "cosine":
        return r.min_lr + (r.lr - r.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return r.min_lr + (r.lr - r.min_lr) * (1 - progress)  # linear (Recipe checks the choice)


def make_optimizer(model: torch.nn.Module, r: Recipe) -> torch.optim.Optimizer:
    """Weight decay on weight matrices only (not biases, LayerNorm scales); AdamW's is decoupled."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": r.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if r.optimizer in ("adam", "adamw"):  # Adam with decoupled weight decay is AdamW
        # The fused kernel updates every tensor in one pass: on small models it saves most of the step's
        # optimiser time. It needs floating-point CPU or CUDA parameters (torch >= 2.4 on the CPU).
        return torch.optim.AdamW(groups, lr=r.lr, betas=tuple(r.betas), fused=_fusable(model))
    return torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum)  # sgd (Recipe checks the choice)


def _fusable(model: torch.nn.Module) -> bool:
    p = next(model.parameters())
    return p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)


def loss_fn(logits: torch.Tensor, target: torch.Tensor, r: Recipe) -> torch.Tensor:
    """Softmax or sigmoid cross-entropy; `target` is class indices or (mixup) class probabilities."""
    logits = logits.float()
    if r.loss == "softmax":
        return F.cross_entropy(logits, target, label_smoothing=r.label_smoothing)
    # sigmoid (Recipe checks the choice): big_vision's sigmoid_xent, summed over classes, averaged over images
    n = logits.shape[1]
    probs = F.one_hot(target, n).float() if target.ndim == 1 else target
    probs = probs * (1 - r.label_smoothing) + r.label_smoothing / n
    return F.binary_cross_entropy_with_logits(logits, probs, reduction="sum") / len(logits)


# With augment_on="device", the draws of this many images' steps are applied in one call: each
# operation runs once per call, so on a GPU larger calls mean fewer kernel launches per image (8,192
# images of 32×32 take about 100 MB as floats). On the CPU, where the work is the arithmetic, calls of
# 2,048 CIFAR images ran at 11,900 images/s and of 8,192 at 9,300 (this project's machine, 2026-11-27).
AUGMENT_CHUNK = {"cuda": 8192, "cpu": 2048}


def too_few_images(batch: int, images: int) -> str:
    """The error of a batch larger than the training data, whatever holds them (memory, a folder)."""
    return f"The batch size {batch} is larger than the {images} training images; lower --batch-size."


def tensor_batches(data: TensorData, r: Recipe, img_size: Any, in_chans: int, batch: int, accum: int,
                   start: int, rank: int, world: int, augment: Optional[BatchAugment] = None,
                   device: Optional[torch.device] = None) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """For each optimiser step from `start`: this rank's `accum` micro-batches of the global batch.

    With `augment`, the uint8 images move to `device` once and are augmented there, several steps at a
    time; else they are converted to model input once, and `r.digits_aug` warps each batch. Either way
    the draws of a step come from (seed, step) and are made for the whole global batch, so each rank's
    share is augmented as in a one-process run."""
    if augment is not None:
        x_all = data.images.to(device)
    else:
        x_all = to_model_input(data.images, img_size, in_chans)  # once: the whole set fits in memory
    per_epoch = len(data) // batch
    if per_epoch == 0:
        raise ValueError(too_few_images(batch, len(data)))
    # This rank's share of each micro-batch, in batch positions: every world-th image of it.
    micro = batch // accum
    mine = torch.arange(batch).view(accum, micro)[:, rank::world].reshape(-1)
    share = len(mine) // accum
    orders: dict[int, torch.Tensor] = {}

    def batch_indices(step: int) -> torch.Tensor:
        """The global batch of `step`: positions in a seeded shuffle of its epoch."""
        epoch, i = divmod(step, per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = torch.randperm(len(data), generator=torch.Generator().manual_seed(derive_seed(r.seed, 1, epoch)))
        return orders[epoch][i * batch:(i + 1) * batch]

    def micro_batches(x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(x[j:j + share], y[j:j + share]) for j in range(0, len(mine), share)]

    def augmentation(step: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(r.seed, 2, step))

    step = start
    if augment is None:  # one step at a time
        while True:
            idx = batch_indices(step)
            if r.digits_aug:
                x = augment_digits(x_all[idx], augmentation(step), rows=mine, **r.digits_aug)
            else:
                x = x_all[idx[mine]]
            yield micro_batches(x, data.labels[idx[mine]])
            step += 1
    from .batch_augment import Draws

    ahead = max(1, AUGMENT_CHUNK.get(x_all.device.type, 2048) // batch)  # steps augmented in one call
    h, w = x_all.shape[-2:]
    while True:
        picked = [batch_indices(s)[mine] for s in range(step, step + ahead)]
        draws = Draws.cat([augment.draw(batch, h, w, augmentation(s))[mine] for s in range(step, step + ahead)])
        x = augment.apply(x_all[torch.cat(picked).to(x_all.device, non_blocking=True)], draws)
        for x_step, idx in zip(x.split(len(mine)), picked):
            yield micro_batches(x_step, data.labels[idx])
        step += ahead


def rebatch(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of exactly `size` from an iterable dataset's loader, whose workers each end their share
    with a short batch: dropping those would lose up to size − 1 images per worker and pass, and make
    a pass shorter than an epoch."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    for x, y in batches:
        if not xs and len(x) == size:  # the usual case: no copy
            yield x, y
            continue
        xs.append(x)
        ys.append(y)
        x, y = torch.cat(xs), torch.cat(ys)
        while len(x) >= size:
            yield x[:size], y[:size]
            x, y = x[size:], y[size:]
        xs, ys = ([x], [y]) if len(x) else ([], [])


def _passes(loader: Iterable[tuple[torch.Tensor, torch.Tensor]], size: int, warn: bool,
            new_pass: Optional[Callable[[int], None]] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An iterable dataset's batches, pass after pass, for as long as an epoch takes them: a pass can hold
    fewer images than the epoch's steps (bad images skipped, a dataset.json that counts more images than
    the shards hold, a rank with fewer shards than another), and its last steps then take images from the
    start of the same pass again, in the order (seed, epoch) gives it, so a resumed run finds them too.
    Ends after a pass of fewer images than one batch of `size`, where no batch could be made. `warn`: say
    so when a pass runs short (once a run is enough: every epoch runs short alike). `new_pass(n)`: called
    before each pass n ≥ 1 (shards without a count, whose whole run is one epoch: it sets the data's epoch
    to n, so that each pass is shuffled and augmented anew, and the same passes again on --resume)."""
    passes = 0
    while True:
        images = 0
        for x, y in loader:
            images += len(x)
            yield x, y
        if images < size:
            return
        if new_pass is not None:
            passes += 1
            new_pass(passes)
        if warn:
            warn = False
            warnings.warn("The training data held fewer images than counted (bad images skipped, or a dataset.json "
                          "counting more images than the shards hold): an epoch's last steps take images from its "
                          "start again.")


class SeededItems(torch.utils.data.Dataset):
    """A map-style dataset read by (index, seed) keys: torch's generator is seeded before each item, so
    an image's augmentation draws follow from its key, whichever worker reads it and whenever the loader
    started (a resumed run starts it mid-epoch, and the workers then take other images)."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        torch.default_generator.manual_seed(seed)
        return self.dataset[index]


def loader_batches(dataset: Any, r: Recipe, batch: int, accum: int, start: int, per_epoch: int,
                   rank: int, world: int, counted: bool = True,
                   skipped: Optional[Callable[[], None]] = None) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The same for image folders (map-style: a seeded order per epoch, resumed mid-epoch) and shards
    (iterable: they shuffle and split themselves by rank and worker; set_epoch each epoch, and a resumed
    run replays its epoch up to the step). Either way an image's augmentation draws are seeded by its
    place in the epoch (for shards, in its reader's stream), so a resumed run draws them again.
    `counted` False: shards without a count, whose one epoch (`per_epoch`: the run's steps) holds as many
    passes as it takes, each with an epoch number of its own. `skipped()`: called once a resumed run has
    replayed its shard streams up to the step, before the step's own batches are read."""
    local = batch // accum // world
    if not isinstance(dataset, torch.utils.data.IterableDataset) and len(dataset) < batch:
        # An epoch of no full batch: its places would run past the images (shards say so after a pass, below).
        raise ValueError(too_few_images(batch, len(dataset)))
    step = start
    while True:
        epoch, i = divmod(step, per_epoch)
        if isinstance(dataset, torch.utils.data.IterableDataset):
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            read, sampler, skip = dataset, None, i * accum
        else:
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(derive_seed(r.seed, 1, epoch)))
            # This rank's places in the epoch (every world-th of each global batch), from the step on.
            places = torch.arange(i * batch, per_epoch * batch).view(-1, world)[:, rank].tolist()
            read, skip = SeededItems(dataset), 0
            sampler = [(int(order[p]), derive_seed(r.seed, 3, epoch, p)) for p in places]
        loader = torch.utils.data.DataLoader(read, batch_size=local, sampler=sampler,
                                             drop_last=sampler is not None, num_workers=r.workers,
                                             persistent_workers=False)
        micro: list[tuple[torch.Tensor, torch.Tensor]] = []
        before = step
        # Shards: pass after pass while the epoch lasts, in batches of `local`; a short pass is said in the first
        # epoch (only where there is a count that a pass can fall short of).
        new_pass = None if counted else getattr(dataset, "set_epoch", None)
        batches = loader if sampler is not None else rebatch(
            _passes(loader, local, warn=counted and step == start, new_pass=new_pass), local)
        with worker_deaths(RESUME_ADVICE):
            for n, (x, y) in enumerate(batches):
                if n < skip:
                    if n == skip - 1 and skipped is not None:
                        skipped()
                    continue
                micro.append((x, y))
                if len(micro) == accum:
                    yield micro
                    micro, step = [], step + 1
                    if step % per_epoch == 0:
                        break
        if step == before:
            raise ValueError(f"The training data yield fewer images than one batch of {batch} per pass; "
                             "lower --batch-size or check the data.")


def save_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, ema: Optional[dict],
               step: int, keep: int, sharded: bool = False) -> None:
    """A training state of tensors and plain containers only (loadable with weights_only=True).

    `sharded` (FSDP): every rank calls; the full model and optimiser state are gathered on rank 0, which writes.
    """
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        weights, opt_state = get_model_state_dict(model, options=_full_options()), \
            get_optimizer_state_dict(model, opt, options=_full_options())
        if dist.get_rank() != 0:
            return
    else:
        weights, opt_state = model.state_dict(), opt.state_dict()
    state = {"model": weights, "optimizer": opt_state, "step": step, "ema": ema if ema is not None else {}}
    atomic_write(path / STATE_PATTERN.format(step), lambda tmp: torch.save(state, tmp))
    for old in sorted(path.glob("step-*.pt"))[:-keep] if keep > 0 else []:
        old.unlink()


def _shard(model: MlpMixer) -> None:
    """FSDP: each Mixer block's parameters, gradients and optimiser state sharded across the ranks, then
    the rest (stem, final norm, head) as one more unit; a block's weights are gathered only while it runs.

    FSDP2's `fully_shard` (torch.distributed.fsdp from torch 2.6, _composable.fsdp in 2.4-2.5; CUDA only
    before 2.7) shards in place: the model keeps its class and parameter names.
    """
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


class StoppedElsewhere(ValueError):
    """This rank stops on an error that another process reports (the set-up of the run failed: `_StartLine`;
    later, an error said already on this machine: `_first_to_say`, `_error_said`), so `mixer` does not print
    this one."""

    reported_elsewhere = True


class _StartLine:
    """Where the ranks of a distributed run meet once, after their set-up and before anything is written.

    Without it a rank whose set-up fails (a path missing on its machine, no state there to resume, a bad
    flag) leaves the others waiting in their first collective, where they fail with a traceback, and an
    error that every rank meets is printed by every rank. Here each rank tells the others whether its
    set-up succeeded; if one failed, all stop, and the first process on each machine (LOCAL_RANK 0)
    reports what went wrong and on which rank, once.
    """

    def __init__(self, distributed: bool, forked: bool = False) -> None:
        self.waiting = distributed
        self.forked = forked  # the processes are `launch`'s, forked by one `mixer train` that asked for no ranks
        # The gathered tensors, kept until the process group is destroyed: torch 2.4's gloo could drop the last
        # reference to them on its worker thread, which then waits for the GIL that destroy_process_group holds
        # while it joins that thread (a deadlock, seen).
        self.tensors: list[torch.Tensor] = []

    def cross(self, error: Optional[Exception] = None) -> None:
        """Meet the other ranks (once; nothing to do in one process); raise if any rank's set-up failed,
        this one's with `error`."""
        if not self.waiting:
            return
        self.waiting = False
        reports = _gather_texts("" if error is None else f"{socket.gethostname()}\t{error}", self.tensors)
        failed = {rank: report.split("\t", 1) for rank, report in enumerate(reports) if report}
        if not failed:
            return
        world = len(reports)
        ranks_by_message: dict[str, list[int]] = {}
        for rank, (_, message) in failed.items():
            ranks_by_message.setdefault(message, []).append(rank)
        if error is not None and len(failed) == world and len(ranks_by_message) == 1:
            combined: Exception = error  # the same error on every rank
        elif self.forked and list(failed) == [0]:  # the main process's own (--out a file): no ranks to name
            combined = error if error is not None else ValueError(failed[0][1])
        else:
            parts = []
            for message, ranks in ranks_by_message.items():
                hosts = ", ".join(sorted({failed[rank][0] for rank in ranks}))
                where = f"On rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of {world} ({hosts}): "
                parts.append(message if len(ranks) == world else where + message)
            combined = ValueError(" ".join(parts))
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            raise combined
        raise StoppedElsewhere(str(combined))


def _first_to_say(error: Exception) -> bool:
    """After the start line the ranks stop one by one, without meeting again: whether this process is the first
    on its machine to say `error`, so that an error every rank meets (a batch larger than the data) is said once,
    and one rank's own error still is. Counted in the process group's store, which torchrun's agent keeps after
    its workers stop; where the store cannot be reached, every process says its error rather than lose it."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.add(_said_here(), 1)  # for `_error_said`
        return store.add(f"{_said_here()}/{error}", 1) == 1
    except RuntimeError:  # the store is gone (its host stopped)
        return True


def _error_said() -> bool:
    """Whether a process on this machine has said an error after the start line (`_first_to_say`): its stop
    breaks the collectives of the others, whose errors (gloo's "Connection closed by peer") say nothing more."""
    try:
        return dist.distributed_c10d._get_default_store().add(_said_here(), 0) > 0
    except RuntimeError:
        return False


def _peer_lost(error: RuntimeError) -> bool:
    """Whether a collective failed because another process of the run is gone, as gloo says it (the one killed:
    "Connection closed by peer" or "Connection reset by peer"; "Broken pipe" when this one was sending)."""
    return any(words in str(error) for words in ("Connection closed by peer", "Connection reset by peer",
                                                   "Broken pipe"))


def _said_here() -> str:
    """The store key that counts the errors said on this machine (torchrun's GROUP_RANK numbers the machines)."""
    return f"mixer/said/{os.environ.get('GROUP_RANK', '')}"


def _gather_texts(text: str, keep: list[torch.Tensor]) -> list[str]:
    """Every rank's `text`, in rank order. As bytes in tensors, not all_gather_object: that one pickles.
    The tensors used go to `keep`."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if dist.get_backend() == "nccl" else None
    world = dist.get_world_size()
    mine = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    count = torch.tensor([len(mine)], device=device)
    dist.all_gather(sizes, count)
    padded = torch.zeros(max(1, *(int(n) for n in sizes)), dtype=torch.uint8, device=device)
    padded[: len(mine)] = mine
    everyone = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(everyone, padded)
    keep += [mine, count, *sizes, padded, *everyone]
    return [bytes(t[: int(n)].tolist()).decode() for t, n in zip(everyone, sizes)]


def _gloo_averages() -> bool:
    """Whether reduce-scatter with ReduceOp.AVG averages over the ranks, as FSDP2 needs for its gradients.

    The gloo backend of some torch releases sums instead, silently (pytorch/pytorch#162338; seen with
    torch 2.7.1: FSDP's gradients were twice those of one process over 2 processes). Each rank contributes
    its rank + 1, and the average is (world + 1) / 2; more elements than ranks catch a divisor that counts
    the elements."""
    world = dist.get_world_size()
    mine = torch.full((3 * world,), float(dist.get_rank() + 1))
    out = torch.empty(3)
    # FSDP's own call where torch has it: reduce_scatter_tensor warns, on every rank, that it is deprecated.
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    try:
        reduce_scatter(out, mine, op=dist.ReduceOp.AVG)
    except RuntimeError:  # an older gloo without AVG at all
        return False
    return bool(torch.allclose(out, torch.full((3,), (world + 1) / 2)))


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _gather(model: torch.nn.Module, plain: Optional[MlpMixer]) -> None:
    """FSDP: every rank sends its shards (all must call); rank 0's unsharded copy `plain` gets the full weights."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_full_options())  # full on rank 0, empty on the others
    if plain is not None:
        plain.load_state_dict(full)


def _summary_writer_class() -> Any:
    """torch's TensorBoard SummaryWriter; tensorboard is an optional dependency, so one sentence without it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("TensorBoard logging needs the tensorboard package; install it with "
                         "pip install 'mlpmixer[tensorboard]'.") from None
    return SummaryWriter


def _summary_writer(path: Path, start: int) -> Any:
    """A TensorBoard writer for `path`. A run resumed at step `start` purges the events of the redone
    steps, as _kept_metrics does for metrics.jsonl."""
    return _summary_writer_class()(str(path), purge_step=start + 1 if start else None)  # steps <= start are kept


def _read_state(path: Path, device: str | torch.device) -> dict[str, Any]:
    """A saved training state, read with weights_only (nothing but tensors and plain containers is
    unpickled). A damaged one (cut short by a full disk or a copy, overwritten, crafted) is one sentence
    naming it, not torch's traceback, whose advice for a refused pickle is to unpickle it anyway."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4" of a file torch did not write
            warnings.simplefilter("ignore")
            # A changed byte in a weight (a bad disk or copy) would load: the archive's checksums tell.
            state = None if zip_damage(path) else torch.load(path, map_location=device, weights_only=True)
    except Exception:  # noqa: BLE001 - torch meets damage with RuntimeError, UnpicklingError, EOFError, ...
        state = None
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "ema"} <= state.keys() \
            or not isinstance(state["step"], int):
        earlier = sorted(p for p in path.parent.glob("step-*.pt") if p.name < path.name)
        then = (f"go on from the state before it, {earlier[-1].name}" if earlier else
                "start the run over (there is no earlier state)")
        raise ValueError(f"{path} is not a readable training state (truncated, damaged, or not written by mixer "
                         f"train); move it out of {path.parent} or delete it, and rerun to {then}.")
    return state


def latest_state(run: Path) -> Optional[Path]:
    states = sorted((run / STATE_DIR).glob("step-*.pt"))
    return states[-1] if states else None


def train(r: Recipe, out: Optional[str | Path] = None, **options: Any) -> RunFiles:
    """Train a Mixer with recipe `r`; write the run directory `out` (default: a new one under runs/).

    Options: resume, save_every (steps; None: 0, or on resuming the run's own), keep (states; None: 3, or the
    run's own), init_from (a checkpoint to fine-tune), progress,
    log (a print function), profile (steps to profile into RUN/profile.txt and profile.json; see
    profiling.py). Under torchrun (RANK/WORLD_SIZE set) this process is one rank of several.
    Stopped by Ctrl-C or SIGTERM (or an error raised in unwinding from one), the interrupt carries `resume_hint`:
    what the run left to go on from, which the command line says.
    """
    global _current_run
    try:
        return _train_and_say(r, out, **options)
    except BaseException as e:
        stop = interrupt_behind(e)
        if stop is not None:
            stop.resume_hint = _resume_hint(_current_run)  # type: ignore[attr-defined]
        raise
    finally:
        _current_run = None


def _train_and_say(r: Recipe, out: Optional[str | Path] = None, **options: Any) -> RunFiles:
    """`train`, its errors said once (one sentence per machine with several processes)."""
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        # Imported before the process group exists: importing torch._dynamo (DDP and FSDP do) while one exists
        # keeps a reference to it (seen with torch 2.14), so destroy_process_group would leave gloo's threads
        # running until the interpreter's exit, where one could abort the finished process (pytorch#190489).
        importlib.import_module("torch._dynamo")  # (an `import torch._dynamo` would make `torch` a local name here)

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    forked = options.get("shared_grads") is not None  # `launch`'s processes
    start_line = _StartLine(distributed, forked)
    # torchrun's processes say their own errors; those that `launch` forks leave them to rank 0 (`_child`).
    saying = distributed and not forked
    try:
        # torch's SIGCHLD handler raises a DataLoader worker's death wherever this process is when the signal comes
        # (a forward or backward pass, a log line, a save), not only where the loader is read: one sentence wherever.
        with worker_deaths(RESUME_ADVICE):
            return _train(r, out, distributed, start_line, **options)
    except (ValueError, OSError, torch.cuda.OutOfMemoryError) as e:
        error = _out_of_memory(r) if isinstance(e, torch.cuda.OutOfMemoryError) else e
        start_line.cross(error)  # a set-up error: the other ranks wait at the start line to hear of it
        if saying and not _first_to_say(error):  # past the start line: said once on each machine
            raise StoppedElsewhere(str(error)) from e
        if error is e:
            raise
        raise error from e
    except RuntimeError as e:
        if saying and _error_said():  # a collective broken by a process that stopped on an error, said already
            raise StoppedElsewhere(f"Another process of the run stopped on an error ({first_line(e)}).") from e
        if saying and _peer_lost(e):  # one that stopped without a word (killed): said once, not as a traceback
            lost = ChildProcessError(f"Another process of the run is gone (killed, or stopped on an error that its "
                                     f"machine shows), so this one stops too; {RESUME_ADVICE}.")
            if not _first_to_say(lost):
                raise StoppedElsewhere(str(lost)) from e
            raise lost from e
        raise
    finally:  # also after an error, so that a caller in the same process can train again
        if distributed:
            dist.destroy_process_group()


def _out_of_memory(r: Recipe) -> OutOfMemory:
    micro = r.batch_size // (r.accum * int(os.environ.get("WORLD_SIZE", 1)))
    return OutOfMemory(f"The GPU ran out of memory with micro-batches of {micro} images per process; raise --accum "
                       f"(--accum {2 * r.accum} keeps the batch of {r.batch_size} in steps half as large), lower "
                       "--batch-size, or add --grad-checkpointing or --bf16; saved training states are kept.")


def _train(
    r: Recipe,
    out: Optional[str | Path],
    distributed: bool,
    start_line: _StartLine,
    *,
    resume: bool = False,
    save_every: Optional[int] = None,
    keep: Optional[int] = None,
    init_from: Optional[str] = None,
    progress: bool = True,
    log: Any = print,
    shared_grads: Optional[SharedGradients] = None,
    profile: int = 0,
) -> RunFiles:
    global _current_run
    t_start = time.time()
    # --- processes: each rank takes a slice of every global batch.
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    main = rank == 0
    # Recorded in config.json, so that a resumed run computes with the same thread count.
    r = r.replace(threads=r.threads or free_cores())
    torch.set_num_threads(r.threads)
    fsdp = r.fsdp and distributed
    # As in `train`: torchrun's ranks say their own errors, those that `launch` forks leave them to rank 0.
    saying = distributed and shared_grads is None
    if fsdp:  # FSDP reduces the gradients of its shards itself
        shared_grads = None
    if r.fsdp and not distributed and main:
        log("--fsdp shards the model over several processes (torchrun); in one process it trains unsharded.")
    if r.bf16 and main and (reason := slow_bf16(device)):
        log(f"Note: {reason}; training without --bf16 will be faster here.")
    if fsdp and r.ema:
        raise ValueError("--fsdp does not keep EMA weights; train with --ema 0 (the paper's pre-training "
                         "recipes use none) or without --fsdp.")
    if fsdp and device.type != "cuda" and torch.__version__ < (2, 7):
        raise ValueError(f"--fsdp on the CPU needs torch >= 2.7 (the FSDP2 of torch {torch.__version__} runs on "
                         "CUDA GPUs only); upgrade torch or train without --fsdp.")
    # A collective before the start line: only checks that every rank meets alike may come before it.
    if fsdp and dist.get_backend() == "gloo" and not _gloo_averages():
        raise ValueError(f"The gloo backend of torch {torch.__version__} does not average where FSDP asks it to "
                         f"(pytorch/pytorch#162338), so --fsdp would train with {world}× the gradients; upgrade "
                         "torch or train without --fsdp.")
    if r.tensorboard and main:
        _summary_writer_class()  # without tensorboard, stop before anything is written
    settings = [name for name in inspect.signature(augment_digits).parameters if name not in ("x", "generator", "rows")]
    if set(r.digits_aug) - set(settings):
        raise ValueError(f"digits_aug has unknown settings {sorted(set(r.digits_aug) - set(settings))}; "
                         f"augment_digits takes {', '.join(settings)}.")
    if r.fast and (r.compile or fsdp):
        raise ValueError(f"--fast is an alternative to {'--compile' if r.compile else '--fsdp'}; choose one.")
    if r.cuda_graphs:  # what one recorded step cannot hold
        refused = {"several processes": world > 1 or shared_grads is not None,
                   "gradient accumulation (--accum)": r.accum > 1, "--compile": r.compile,
                   # Checkpointing reads the GPU's random state while recording, which torch before 2.10 refuses.
                   "--grad-checkpointing": r.grad_checkpointing,
                   "SGD (its step reads the learning rate as a number)": r.optimizer == "sgd"}
        for what, found in refused.items():
            if found:
                raise ValueError(f"--cuda-graphs records a step of one process without {what}; train without "
                                 "one or the other.")
        if device.type != "cuda" and main:
            log("Note: --cuda-graphs needs a CUDA GPU; here the steps run as they would be recorded, without graphs.")
    if r.batch_size % (r.accum * world):
        raise ValueError(f"The batch size {r.batch_size} must divide into {r.accum} accumulation "
                         f"step{'s' * (r.accum > 1)} × {world} process{'es' * (world > 1)}; choose a multiple of "
                         f"{r.accum * world}.")

    # --- run directory: one that holds a run already is refused here, before the data are read (decoding
    # CIFAR-10 took 15 s before the refusal).
    run = Path(out) if out else None
    if run is not None and (run / "config.json").exists() and not latest_state(run) \
            and not (run / "model.safetensors").exists():
        # A run stopped before its first saved state (killed, or an error such as a batch larger than the
        # data): its config.json and metrics hold nothing to lose, and the corrected command starts it over.
        if main:
            log(f"Note: {run} holds no saved training state and no model (the run there stopped before its first "
                "save); starting it over.")
        resume = False
    elif not resume and run is not None and any((run / name).exists() for name in ("config.json", "model.safetensors",
                                                                                     STATE_DIR)):
        way = ("add --resume to go on from its last saved state, or give another --out" if latest_state(run) else
               "give another --out, or delete it to start again there (it has no saved state to resume from)")
        raise FileExistsError(f"{run} holds a run already; {way}; nothing in it was changed.")

    # --- data.
    # Fine-tuning keeps the checkpoint's channels, and its input size unless r.img_size asks for another
    # (the model is then converted with resize_to); the data are converted to them.
    init_config = read_checkpoint(init_from)[1] if init_from else None
    tensors = load_tensors(r.data, split="train")
    # Evaluation digits held in memory (mnist5k, an IDX folder) are opened as `mixer eval` opens them, once the
    # model is built, whatever the training data.
    eval_in_memory = r.eval_data is not None and (r.eval_data == MNIST5K or is_idx_folder(r.eval_data))
    if tensors is not None and r.augment_on == "device" and main:
        log(f"--augment-on device is for image folders and shards; {r.data} is in memory already and "
            "augmented batch by batch (digits_aug).")
    unused = [name for name, off in (("randaugment", None), ("autoaugment", None), ("pad_crop", 0), ("mixup", 0),
                                     ("cutmix", 0))
              if getattr(r, name) != off]
    if tensors is not None and unused and main:  # config.json records them: say they did nothing
        they = "they are" if len(unused) > 1 else "it is"
        log(f"Note: {', '.join('--' + name.replace('_', '-') for name in unused)} augment image folders and shards; "
            f"{r.data} is in memory and augmented with digits_aug only, so {they} not used.")
    if tensors is not None:
        if r.eval_data is None and r.holdout >= max(1, len(tensors)):  # a count that leaves nothing to train on
            raise holdout_too_large(r.holdout, len(tensors), r.data)
        train_idx, val_idx = holdout_split(len(tensors), r.holdout if r.eval_data is None else 0, r.seed)
        train_data, class_names = tensors.subset(train_idx), tensors.class_names
        val_data: Any = tensors.subset(val_idx) if len(val_idx) else None
        img_size, in_chans = r.img_size or tuple(tensors.images.shape[-2:]), tensors.images.shape[1]
        num_train: Optional[int] = len(train_data)
        if init_config:
            img_size, in_chans = r.img_size or init_config.img_size, init_config.in_chans
    else:
        from .sources import check_same_classes, holdout_share, is_split_pair, open_folder_or_shards, read_into_memory
        from .transforms import eval_transform, mixup_cutmix, train_transform

        img_size, in_chans = r.img_size or variant_config(r.model).img_size, 3  # the variant's own: nano/4 32×32
        if init_from:  # fine-tuning keeps the checkpoint's channels (and size, unless r.img_size)
            img_size, in_chans = r.img_size or init_config.img_size, init_config.in_chans
        pair = is_split_pair(r.data)  # its val/ is the validation data
        holdout = holdout_share(r.data, r.holdout if r.eval_data is None and not pair else 0.0, r.seed)
        if r.augment_on == "device":  # decoded once here, augmented batch by batch on the device
            train_data = read_into_memory(r.data, "train", holdout, r.seed, in_chans, r.workers,
                                          progress=main and progress)
            class_names, num_train = train_data.class_names, len(train_data)
        else:
            t_train = train_transform(img_size, in_chans, crop_area=tuple(r.crop_area),
                                      randaugment_m=r.randaugment, flip=r.flip, pad_crop=r.pad_crop,
                                      autoaugment=r.autoaugment)
            source = open_folder_or_shards(r.data, "train", holdout, r.seed, t_train, replace_bad=True)
            train_data, class_names, num_train = source.dataset, source.class_names, source.num_examples
            train_data.bad_samples.share(world)  # each process reads and counts its share of an epoch
        val_data = None
        if (holdout or r.eval_data or pair) and not eval_in_memory:
            t_eval = eval_transform(img_size, in_chans, r.eval_mode)
            if r.augment_on == "device":
                # Decoded once too: through the workers, each evaluation read every shard again (the H200
                # cifar10-nano run's wall time beyond its training steps and start-up: about 6 s each).
                held = read_into_memory(r.eval_data or r.data, "val", holdout, r.seed, in_chans, r.workers,
                                        progress=main and progress)
                val_data = Source(TensorDataset(held, t_eval), held.class_names, len(held))
            else:
                val_data = open_folder_or_shards(r.eval_data or r.data, "val", holdout, r.seed, t_eval)
            check_same_classes(class_names, val_data.class_names)
    num_classes = len(class_names)
    if num_classes < 2:  # the softmax of one class is 1 whatever the image: nothing to learn, a loss of 0
        raise ValueError(f"{r.data} holds one class ({class_names[0]}); a classifier needs images of two or more.")

    # --- model.
    torch.manual_seed(r.seed)
    if init_from:
        model = load_checkpoint(init_from, drop_path_rate=r.drop_path, drop_rate=r.dropout, proj_drop_rate=r.dropout)
        verb, origin = "Fine-tuning", f" from {init_from} (a new zero-initialised head"
        if as_pair(img_size) != model.config.img_size:  # paper Appendix C: fine-tune at another resolution
            (h, w), was = as_pair(img_size), model.config.img_size
            model = resize_to(model, img_size, method=r.resize_method)
            origin += f"; converted from {was[0]}×{was[1]} to {h}×{w} by {r.resize_method}"
        origin += ")"
        model.reset_classifier(num_classes)  # always a new zero-initialised head (paper Appendix C)
        # config.json's recipe then names this model, not the recipe's default: `--config RUN/config.json` builds it.
        r = r.replace(**_recipe_model(model.config, r.model))
    else:
        model = create_model(r.model, num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                             drop_path_rate=r.drop_path, drop_rate=r.dropout, proj_drop_rate=r.dropout, **r.model_args)
        verb, origin = "Training", ""
    model.class_names = list(class_names)
    if r.eval_data and (tensors is not None or eval_in_memory):  # evaluated as `mixer eval` opens the data
        from .sources import check_same_classes

        val_data = open_eval_data(r.eval_data, model, r.eval_mode)
        check_same_classes(class_names, val_data.class_names)
    # Paper Figure 4: one fixed permutation of every training and validation image (None: off).
    permute = (FixedPermutation(r.permute, model.config.img_size, model.config.patch_size, r.permute_seed)
               if r.permute else None)
    if r.loss == "sigmoid":  # big_vision: the (new) head starts at a prior of 1/classes
        torch.nn.init.constant_(model.head.bias, -math.log(num_classes))
    model.set_grad_checkpointing(r.grad_checkpointing)
    model.to(device)
    # What rank 0 evaluates and saves: the model itself, or under FSDP an unsharded copy that receives the
    # gathered weights (on the device, to evaluate at its speed: parameters only, no gradients or optimiser).
    plain: Optional[MlpMixer] = model
    if fsdp:
        plain = copy.deepcopy(model) if main else None
        _shard(model)  # before the optimiser, which must hold the shards
    opt = make_optimizer(model, r)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if r.ema else None

    per_epoch = (num_train // r.batch_size) if num_train else 0
    if r.steps:
        total = r.steps
    elif per_epoch:
        total = max(1, round(r.epochs * per_epoch))
        if total > MAX_STEPS:
            raise ValueError(f"--epochs {r.epochs:g} of {per_epoch:,} steps each make more than the {MAX_STEPS:,} "
                             "steps a run can have; lower --epochs.")
    elif num_train:  # counted, but not one batch: before anything is written, as no epoch can be counted
        raise ValueError(too_few_images(r.batch_size, num_train))
    else:
        raise ValueError(f"{r.data} does not say how many images it holds; give --steps.")
    # Without a count (shards whose dataset.json gives none) an epoch is unknown: metrics say null, not the
    # fraction of the run that done / total would give.
    counted = per_epoch > 0
    per_epoch = per_epoch or total

    def epoch_at(steps_done: int) -> Optional[float]:
        """The epochs that `steps_done` steps make, for metrics.jsonl (None without a count)."""
        return round(steps_done / per_epoch, 3) if counted else None

    if main and r.warmup >= total:
        log(f"Note: the warm-up of {int(r.warmup)} steps covers the whole run of {total}: the learning rate never "
            "decays; give --warmup as a fraction of the run (e.g. 0.05) or more steps.")

    # --- the run to resume.
    start = 0
    note: Optional[str] = None  # resuming with other settings than the run's
    recorded_from = init_from  # where a fine-tuning run started: on resuming, where the run says it did
    if resume:
        run = run or _latest_run()
        state_path = latest_state(run)
        if state_path is None:
            # torchrun's LOCAL_WORLD_SIZE counts this machine's processes: fewer than all means several machines.
            shared = (" every rank reads it there, so with several machines put the run directory on a file system "
                      "they share, or" if world > int(os.environ.get("LOCAL_WORLD_SIZE", world)) else "")
            raise FileNotFoundError(f"{run} has no saved training state ({STATE_DIR}/step-*.pt) to resume "
                                    f"from;{shared} train with --save-every N first.")
        saved = run_config(run)
        note = _check_resumable(run, saved, model.config, r, init_from, world)
        # The run's own saving, unless given: resumed through its config.json (which holds the recipe, not these
        # run flags) it saved no state again, and a second kill lost all it did after the resume.
        if save_every is None and saved is not None and "save_every" not in saved and main:
            log(f"Note: {run}/config.json predates the record of --save-every, so this resume saves no training "
                "state; give --save-every N to keep saving.")
        save_every = (saved or {}).get("save_every") if save_every is None else save_every
        keep = (saved or {}).get("keep") if keep is None else keep
        recorded_from = saved.get("init_from") if saved is not None else init_from
        # FSDP: each rank keeps only its shards of the full state, so read it to the CPU, not the device.
        state = _read_state(state_path, "cpu" if fsdp else device)
        if fsdp:  # the state holds full tensors (keyed by name): each rank keeps its shards
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        try:
            if fsdp:
                set_model_state_dict(model, state["model"], options=_full_options())
            else:
                model.load_state_dict(state["model"])
        except RuntimeError:  # load_state_dict's list of size mismatches (FSDP's too): a run whose config.json is gone
            raise ValueError(f"{state_path} holds weights of other shapes than the {model.config.describe()} this "
                             "command builds; resume with the run's own settings (--model, --img-size) and the "
                             "same data.") from None
        try:
            if fsdp:
                set_optimizer_state_dict(model, opt, state["optimizer"], options=_full_options())
            else:
                opt.load_state_dict(state["optimizer"])
        except (KeyError, ValueError) as e:  # another optimiser's state, whose run left no config.json
            raise ValueError(f"{state_path} holds the state of another optimiser than --optimizer {r.optimizer} "
                             f"({type(e).__name__}: {e}); resume with the run's own settings.") from None
        ema = state["ema"] or ema
        start = int(state["step"])
        if start > total:  # (start == total: a run killed before its model was written; resuming writes it)
            raise ValueError(f"{state_path} was saved after step {start}, beyond the {total} steps of this command's "
                             f"run; give --steps {start} or more (or as many --epochs) to go on from it; nothing "
                             "was changed.")
    save_every, keep = save_every or 0, 3 if keep is None else keep
    if profile and total - start < StepProfiler.steps_needed(profile):
        raise ValueError(f"--profile {profile} needs {StepProfiler.steps_needed(profile)} steps (the first ones are "
                         f"not profiled) and this run has {total - start} left; lower it or raise --steps.")
    if main:
        check_writable_folder(run or Path("runs"), "--out")
    # Read before the start line, so that a malformed metrics.jsonl stops every rank there; written back below.
    metrics = _kept_metrics(run / "metrics.jsonl", start) if main and run is not None else None
    start_line.cross()  # every rank is set up: from here on files are written
    if resume and start == total and (run / "model.safetensors").exists():
        # Finished: nothing is left to train, so its files (config.json, the model, metrics) stay as the run
        # wrote them; settings this command changes would otherwise be recorded for steps never run. After the
        # start line: a rank that cannot resume (no state on its machine) still stops every rank.
        if main:
            log(f"{run} finished its {total} steps already; nothing was changed (give more --steps or --epochs "
                "to train it further).")
        return RunFiles(run, run / "model.safetensors", run / "config.json", run / "metrics.jsonl", run / "curves.png")
    if note and main:  # after every check: a run that one of them stops does not go on with other settings
        log(note)
    run = run or new_run_dir()
    files = RunFiles(run, run / "model.safetensors", run / "config.json", run / "metrics.jsonl",
                     run / "curves.png")

    def draw_curves() -> None:  # at the end, and when the loss diverges: the curves up to it
        from .plots import curve_labels, plot_curves

        plot_curves(files.metrics, files.curves, *curve_labels(r, in_memory=tensors is not None))

    _current_run = run
    if main:
        run.mkdir(parents=True, exist_ok=True)
        for folder in (run, run / STATE_DIR):  # what a kill in the middle of a save left: never renamed into place
            remove_temporaries(folder)
        config = {"model": model.config.to_dict(), "recipe": r.to_dict(), "class_names": list(class_names),
                  "steps": total, "world_size": world, "save_every": save_every, "keep": keep}
        if recorded_from:  # where a fine-tuning run started (the recipe's `model` is not what it trains)
            config["init_from"] = str(recorded_from)
        text = json.dumps(config, indent=1) + "\n"
        atomic_write(files.config, lambda tmp: Path(tmp).write_text(text))  # also on resuming: the old one stays whole
        if metrics is not None:
            atomic_write(files.metrics, lambda tmp: Path(tmp).write_bytes(metrics))
    board = _summary_writer(run / "tensorboard", start) if main and r.tensorboard else None

    net: torch.nn.Module = model
    if r.fast:  # the same parameters, run through fused kernels (fast.py); evaluation and saving use `plain`
        from .fast import optimize

        net = optimize(model, cuda_graphs=False)
    ddp = distributed and not fsdp and shared_grads is None
    if shared_grads is not None:  # processes forked by `launch`: gradients averaged in shared memory
        shared_grads.attach(rank, model.parameters())
    elif ddp:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[local_rank] if device.type == "cuda" else None)
    if r.compile:  # where compiling fails, the plain path runs, with one warning
        net = CompiledOrEager(net)
    batch_fn = mixup_cutmix(num_classes, r.mixup, r.cutmix, r.mix_prob) if tensors is None else None
    if tensors is not None:
        batches = tensor_batches(train_data, r, img_size, in_chans, r.batch_size, r.accum, start, rank, world)
    elif isinstance(train_data, TensorData):  # augment_on="device"
        from .batch_augment import BatchAugment

        augment = BatchAugment(img_size, tuple(r.crop_area), r.flip, r.randaugment, r.pad_crop, r.autoaugment)
        batches = tensor_batches(train_data, r, img_size, in_chans, r.batch_size, r.accum, start, rank, world,
                                 augment=augment, device=device)
    else:
        def restart_clock() -> None:
            """The first img_per_s after resuming shards: the replay of the epoch up to the step is not training."""
            nonlocal t_log
            t_log = time.time()

        batches = loader_batches(train_data, r, r.batch_size, r.accum, start, per_epoch, rank, world, counted,
                                 skipped=restart_clock)
    eval_at = {round(total * (i + 1) / r.evals) for i in range(r.evals)} if r.evals else {total}
    # Validation images held in memory are transformed in this process: worker processes would cost more.
    eval_workers = 0 if isinstance(getattr(val_data, "dataset", None), TensorDataset) else r.workers
    # A CUDA graph must not read autocast's cache of the weights' bf16 copies: it is emptied after each step.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=r.bf16, cache_enabled=not r.cuda_graphs)

    if main:
        what = f"{model.config.describe()} ({model.config.num_params():,} parameters)"
        # How many images each validation scores: a hold-out count is met about (shards, folders) or exactly.
        checked = (len(val_data) if isinstance(val_data, TensorData) else val_data.num_examples) \
            if val_data is not None else None
        validating = f", validating on {checked}" if checked else ""
        log(f"{verb} {what}{origin} on {r.data} ({num_train if num_train else '?'} images{validating}, "
            f"{num_classes} classes) for {total} step{'s' * (total != 1)} of {r.batch_size}"
            + (f", resuming at step {start}" if start else "") + f"; run: {run}")
    bar = tqdm(total=total, initial=start, desc="training", unit="step", disable=None if main and progress else True,
               dynamic_ncols=True)
    model.train()
    # Losses and hits stay on the device between log lines: reading one back waits for the device, and
    # on a GPU that wait per step would keep the host from queueing the next step while this one runs.
    # So on a GPU the losses are also checked for NaN only before anything is logged, evaluated or saved.
    check_every_step = not _defer_checks(device)
    if ema is not None:
        # The live tensors, found once: the optimiser and load_state_dict update them in place. Calling
        # state_dict() every step cost 1.2 ms of host time (cProfile, this project's CPU), where a whole
        # cifar10-nano step takes 21 ms on an H200.
        live = model.state_dict()
        floats = [k for k in ema if ema[k].dtype.is_floating_point]
        ema_floats, live_floats = [ema[k] for k in floats], [live[k] for k in floats]
        ema_others = [(ema[k], live[k]) for k in ema.keys() - set(floats)]
    unchecked: list[tuple[int, torch.Tensor]] = []  # (step, loss) not yet checked to be finite
    params = list(model.parameters())  # once: walking the modules every step costs host time
    profiler = StepProfiler(profile, run, device, r.batch_size, bar.write) if profile and main else None
    # Summed on the device (in place: a CUDA graph adds to these very tensors) and read at each log line.
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
    seen, t_log, count = 0, time.time(), 0

    def forward_backward(x: torch.Tensor, target: torch.Tensor, y: torch.Tensor, parts: int) -> torch.Tensor:
        """One micro-batch of `parts`: its gradients added to the parameters', its loss returned."""
        with autocast:
            logits = net(x)
        loss = loss_fn(logits, target, r)
        (loss / parts).backward()
        loss_sum.add_(loss.detach() * len(y))
        correct.add_((logits.argmax(1) == y).sum())
        return loss.detach()

    def update(ema_weight: float | list[torch.Tensor]) -> None:
        """The optimiser's step from the gradients, then the EMA weights' (`ema_weight`: how far they move)."""
        if r.clip:
            torch.nn.utils.clip_grad_norm_(params, r.clip)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                # One multi-tensor kernel, not one per tensor (on a GPU, launches are most of a small step).
                torch._foreach_lerp_(ema_floats, live_floats, ema_weight)
                for saved, current in ema_others:
                    saved.copy_(current)

    graphed = None
    if r.cuda_graphs:  # the whole step, one micro-batch, recorded once and replayed (graphed.py)
        from .graphed import GraphedStep

        step_loss = torch.zeros((), device=device)
        ema_weight = torch.zeros((), device=device)  # a tensor, so that a replay reads each step's

        def graphed_step(x: torch.Tensor, target: torch.Tensor, y: torch.Tensor) -> None:
            step_loss.copy_(forward_backward(x, target, y, 1))
            update([ema_weight] * len(ema_floats) if ema is not None else 0.0)

        graphed = GraphedStep(graphed_step, opt, capture=device.type == "cuda")

    def validate(done: int) -> None:
        """Score the model (its EMA weights where kept) on the validation data, after step `done`. Validation data
        that stops the run (too many bad images) does not lose the training done: the state of the step is saved
        first (unless FSDP, whose ranks save together), and --resume goes on from it, redoing this validation."""
        nonlocal t_log
        t_eval = time.time()
        try:
            with _swap_in(model, ema), worker_deaths(RESUME_ADVICE):
                m = evaluate(plain, val_data, batch_size=500, workers=eval_workers, device=device, transform=permute)
        except ValueError as e:
            state = run / STATE_DIR / STATE_PATTERN.format(done)
            if fsdp:
                raise
            if not state.exists():
                with _saving(state, run):
                    save_state(run / STATE_DIR, model, opt, ema, done, keep)
            raise ValueError(f"{str(e).rstrip('.')}; the training state of step {done} was saved first ({state}): "
                             "fix the validation data and add --resume to go on from it.") from e
        _append(files.metrics, {"step": done, "epoch": epoch_at(done), "val_loss": m["loss"],
                                "val_top1": m["top1"], "val_top5": m["top5"], "val_n": m["n"]})
        if board is not None:
            for key in ("val_loss", "val_top1", "val_top5"):
                if m[key[4:]] is not None:  # top5 of 5 classes or fewer: not measured
                    board.add_scalar(key.replace("_", "/", 1), m[key[4:]], done)
        bar.write(f"step {done}/{total}: validation top-1 {m['top1']:.2%} (n={m['n']})")
        t_log += time.time() - t_eval  # images/s counts training time: validation is left out

    if resume and main and not fsdp and val_data is not None and start in eval_at and not _validated(metrics, start):
        validate(start)  # the validation that stopped the run it resumes (its state was saved before it)
    for step in range(start, total):
        raise_if_stopped()  # a Ctrl-C or SIGTERM whose exception a finaliser swallowed
        # --- one optimiser step: accumulate gradients over the micro-batches.
        lr = lr_at(step, total, r)
        if graphed is not None:
            graphed.set_lr(lr)
        else:
            for group in opt.param_groups:
                group["lr"] = lr
        decay = min(r.ema, (1 + step) / (10 + step))  # EMA: short warm-up, early weights fade fast
        try:
            micro = next(batches)
        except ValueError as e:
            # Too many bad images (sources.BadDataError, not imported here: it would import torchvision): metrics.jsonl
            # ends with the count the error says, which the last line, written up to 9 steps before, lags.
            if main and getattr(e, "bad", None) is not None:
                _append(files.metrics, {"step": step, "epoch": epoch_at(step), "bad_samples": e.bad})
            raise
        # After the batch: reading it can draw from torch's generator (images augmented in this process,
        # a DataLoader started), and more so in a resumed run, which starts its loader mid-epoch.
        reseed(derive_seed(r.seed, 4, step))  # dropout / stochastic depth / mixup of this step
        for j, (x, y) in enumerate(micro):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if permute is not None:  # after the augmentation, before mixing images
                x = permute(x)
            target = y
            if batch_fn is not None:
                x, target = batch_fn(x, y)
            if graphed is not None:
                if batch_fn is not None and target.ndim == 1:  # unmixed: a graph's inputs keep their shape
                    target = F.one_hot(target, num_classes).float()
                ema_weight.fill_(1 - decay)
                graphed(x, target, y)
                loss = step_loss.clone()
            else:
                # FSDP reduces every micro-batch's gradients (correct, with more communication than DDP's no_sync).
                with net.no_sync() if ddp and j < len(micro) - 1 else contextlib.nullcontext():
                    loss = forward_backward(x, target, y, len(micro))
            unchecked.append((step, loss))
            if check_every_step:
                _check_finite(unchecked, run, bar, main, draw_curves, saying)
            count += len(y)
        if graphed is None:
            if shared_grads is not None:
                shared_grads.average()
            update(1 - decay)
            opt.zero_grad(set_to_none=True)
        seen += r.batch_size
        done = step + 1
        epoch = epoch_at(done)
        if done % 10 == 0 or done == total or done in eval_at or (save_every and done % save_every == 0):
            _check_finite(unchecked, run, bar, main, draw_curves, saying)

        # --- logging, evaluation, saving.
        if main and (done % 10 == 0 or done == total):
            now = time.time()
            entry = {"step": done, "epoch": epoch, "lr": lr, "train_loss": loss_sum.item() / count,
                     "train_acc": int(correct) / count, "img_per_s": round(seen / (now - t_log), 1)}
            counter = getattr(train_data, "bad_samples", None)  # images the sources could not decode
            if counter is not None:
                entry["bad_samples"] = counter.bad
            _append(files.metrics, entry)
            if board is not None:
                for key in ("train_loss", "train_acc", "lr", "img_per_s", "bad_samples"):
                    if key in entry:
                        board.add_scalar("train/" + key.removeprefix("train_"), entry[key], done)
            bar.set_postfix(loss=f"{entry['train_loss']:.3f}", acc=f"{entry['train_acc']:.3f}", lr=f"{lr:.2e}",
                            img_s=f"{entry['img_per_s']:.0f}", refresh=False)
            seen, t_log, count = 0, now, 0
            loss_sum.zero_()
            correct.zero_()
        bar.update(1)
        if fsdp and val_data is not None and done in eval_at:
            _gather(model, plain)
        if main and val_data is not None and done in eval_at:
            validate(done)
        if save_every and (main or fsdp) and (done % save_every == 0 or done == total):
            with _saving(run / STATE_DIR / STATE_PATTERN.format(done), run):
                save_state(run / STATE_DIR, model, opt, ema, done, keep, sharded=fsdp)
        if profiler is not None:
            profiler.step()
    if profiler is not None:
        profiler.close()
    bar.close()
    if board is not None:
        board.close()
    if fsdp:
        _gather(model, plain)

    if main:
        with _swap_in(plain, ema), _saving(files.model, run):
            save_checkpoint(plain, files.model, class_names=list(class_names))
        draw_curves()
        log(f"Done in {time.time() - t_start:.1f} s. Model: {files.model}; configuration: {files.config}; "
            f"metrics: {files.metrics}; curves: {files.curves}")
    if fsdp:
        # The ranks leave together, after rank 0's files. FSDP's process group outlives destroy_process_group
        # (DTensor's caches hold its device mesh; torch 2.14), so gloo's threads run on until the interpreter
        # exits, and one still letting go of the tensors that `_gather` sent then aborts its process
        # (pytorch#190489). By the end of this barrier they have let go of them.
        dist.barrier()
    return files


def _resume_hint(run: Optional[Path]) -> Optional[str]:
    """What the run in `run`, stopped by Ctrl-C or SIGTERM, left to go on from, in a sentence; None before a run
    folder was chosen (nothing was trained)."""
    if run is None:
        return None
    states = sorted((run / STATE_DIR).glob("step-*.pt"))
    if not states:
        return (f"{run} holds no saved training state to resume from (--save-every N saves one every N steps; "
                "the default is none).")
    return (f"{run}'s last saved training state is step {int(states[-1].stem.split('-')[1])}: the same command "
            f"with --out {run} --resume goes on from there.")


def _recipe_model(config: MixerConfig, base: str) -> dict[str, Any]:
    """The recipe fields that make `mixer train` build `config` (the classes and channels come from the data):
    its variant, else the variant it was made from (its name survives resize_to, whose token MLPs are wider than
    any variant's), else `base`, with what differs from that variant in `model_args`, and its input size (N, or
    [H, W] where it is not square)."""
    name = paper_variant_of(config) or (config.name if config.name in DEFAULT_IMG_SIZE else base)
    defined = variant_config(name).to_dict()
    args = {k: v for k, v in config.to_dict().items() if k in SHAPE_FIELDS | {"gelu"} and v != defined[k]}
    h, w = config.img_size
    return {"model": name, "model_args": args, "img_size": h if h == w else [h, w]}


def _check_resumable(run: Path, saved: Optional[dict[str, Any]], config: MixerConfig, r: Recipe,
                     init_from: Optional[str], world: int) -> Optional[str]:
    """Resuming builds the model and optimiser from the command's settings: a model of other shapes,
    another optimiser or a fine-tuning run resumed without its --from is one sentence here (not
    load_state_dict's list of mismatches or KeyError); other recipe settings give the note returned, as the
    run then goes on differently from the one it resumes. `saved`: the run's config.json (None: there is none)."""
    if saved is None:  # a state without its configuration: the state itself decides
        return None
    def shapes(d: dict) -> dict:  # what the weights' shapes depend on
        return {k: v for k, v in d.items()
                if k not in ("name", "gelu", "drop_rate", "proj_drop_rate", "drop_path_rate")}

    if saved.get("init_from") and not init_from:
        raise ValueError(f"{run} fine-tunes {saved['init_from']}; resume it with its own settings: mixer finetune "
                         f"--config {run / 'config.json'} --from {saved['init_from']} --out {run} --resume.")
    if init_from and not saved.get("init_from"):  # it would be recorded as a fine-tuning of init_from
        raise ValueError(f"{run} trains a model from scratch, not a fine-tuning; resume it with its own settings: "
                         f"mixer train --config {run / 'config.json'} --out {run} --resume.")
    if shapes(saved["model"]) != shapes(config.to_dict()):
        def what(c: MixerConfig) -> str:
            return (f"{c.describe()} ({c.img_size[0]}×{c.img_size[1]}, {c.in_chans} channel{'s' * (c.in_chans > 1)}, "
                    f"{c.num_classes} classes)")

        way = (f"mixer finetune --config {run / 'config.json'} --from {saved['init_from']}" if saved.get("init_from")
               else f"mixer train --config {run / 'config.json'}")
        raise ValueError(f"{run} trains {what(MixerConfig.from_dict(saved['model']))} and this command builds "
                         f"{what(config)}; resume it with its own settings: {way} --out {run} --resume.")
    was = saved["recipe"].get("optimizer")
    if was != r.optimizer and "sgd" in (was, r.optimizer):  # adam and adamw both train with AdamW's state
        raise ValueError(f"{run} was trained with --optimizer {was}, whose saved state --optimizer {r.optimizer} "
                         f"cannot go on from; resume with --optimizer {was} (the run's settings are in its "
                         "config.json).")
    now = json.loads(json.dumps(r.to_dict()))  # as config.json holds it: tuples as lists
    # The process and thread counts are taken from the run (launch); only the count chosen is recorded. A
    # fine-tuning run's model fields follow from its checkpoint, whose shapes are compared above.
    ignored = {"processes", "threads"} | ({"model", "model_args", "img_size"} if init_from else set())
    changed = [f"{k} {saved['recipe'].get(k)!r} -> {v!r}" for k, v in now.items()
               if k not in ignored and saved["recipe"].get(k) != v]
    if saved.get("world_size", world) != world:  # the order of the gradient sums: no longer bit for bit
        changed.append(f"processes {saved['world_size']} -> {world}")
    notes = []
    if changed:
        notes.append(f"Resuming with settings other than the run's ({', '.join(changed)}): the run goes on with "
                     "these, so it will not end as the run it resumes would have.")
    if saved.get("init_from") and not _same_checkpoint(saved["init_from"], init_from):
        notes.append(f"Note: --from {init_from} is not where {run} started ({saved['init_from']}); the model is built "
                     "from it, its weights then come from the run's saved state, and config.json keeps where it "
                     "started.")
    return "\n".join(notes) or None


def _same_checkpoint(a: str, b: str) -> bool:
    """Whether two --from paths name one checkpoint (a run directory and its model file are one); a path that
    does not resolve from here (a relative one recorded elsewhere) is taken as the same: nothing to say."""
    try:
        return resolve_path(a).resolve() == resolve_path(b).resolve()
    except ValueError:  # CheckpointError: missing, or not a checkpoint
        return True


def _defer_checks(device: torch.device) -> bool:
    """Whether losses are checked for NaN only at log, evaluation and save points (on GPUs)."""
    return device.type == "cuda"


def _check_finite(unchecked: list[tuple[int, torch.Tensor]], run: Path, bar: tqdm, main: bool,
                  draw_curves: Callable[[], None], saying: bool = False) -> None:
    """Raise TrainingDiverged naming the first step whose loss is NaN or infinite, after `draw_curves` (on the
    main process); empties `unchecked`. `saying`: this is one of several ranks that each say their own errors.

    The state saved after k steps holds weights that no forward pass has met yet: when the loss of the
    next step (step k + 1, as the progress bar counts) is not finite, that state is the one that gives it,
    so it is moved aside (kept, under a name --resume does not pick) and the state before it is named."""
    if not unchecked:
        return
    losses = torch.stack([loss for _, loss in unchecked]).float().cpu()  # one wait for the device
    steps = [step for step, _ in unchecked]
    unchecked.clear()
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        i = int(bad[0])
        bar.close()
        before = run / STATE_DIR / STATE_PATTERN.format(steps[i])  # the weights the bad loss came from
        moved = ""
        if main and before.exists():
            aside, n = before.with_name("diverged-" + before.name), 1
            while aside.exists():  # an earlier attempt's, kept too
                n += 1
                aside = before.with_name(f"diverged{n}-{before.name}")
            before.replace(aside)
            moved = f"the state saved after step {steps[i]}, whose weights gave it, was moved aside to {aside}; "
        last = latest_state(run)
        kept = (f"the last good checkpoint is {last}" if last else "no earlier state is kept (see --keep)" if moved
                else "no checkpoint had been saved yet (--save-every N saves one every N steps)")
        if main:
            draw_curves()
        said = (f"The loss became {losses[i].item()} in step {steps[i] + 1} (counted as the progress bar counts); "
                f"{moved}{kept}. Lower the learning rate, add warm-up or clipping (--clip 1), and resume.")
        raise TrainingDiverged(_as_rank_0_says(f"mixer/diverged/{steps[i]}", said, main) if saying else said)


def _as_rank_0_says(key: str, text: str, main: bool) -> str:
    """A NaN loss of several processes, as rank 0 says it. The ranks hold the same weights, so they usually meet it
    in the same step, but only rank 0 keeps the checkpoints and moves the bad one aside: the others' `text` names
    them as they saw them, racing that move (or, on another machine, not at all), and as a different sentence it
    was printed too (`_first_to_say`). So rank 0 posts its `text` in the store under `key`, and the others take it,
    waiting DIVERGED_WAIT_S for it (after the curves that rank 0 draws first); a rank whose own batch alone gave
    the NaN says its own after that."""
    try:
        store = dist.distributed_c10d._get_default_store()
        if main:
            store.set(key, text)
            return text
        store.wait([key], timedelta(seconds=DIVERGED_WAIT_S))
        return store.get(key).decode()
    except RuntimeError:  # not posted in time, or the store is gone
        return text


@contextlib.contextmanager
def _saving(path: Path, run: Path) -> Iterator[None]:
    """A save that fails is one sentence saying what to do, not torch's "basic_ios::clear: iostream error"
    or safetensors' "os error 28" traceback (a full disk, the usual cause); atomic_write has removed the
    temporary file, so the states saved before are whole and --resume goes on from the last."""
    try:
        with worker_deaths(RESUME_ADVICE):  # a DataLoader worker killed meanwhile is not the save's failure
            yield
    except ChildProcessError:
        raise
    except (OSError, RuntimeError, SafetensorError) as e:  # torch reports a failed write as a RuntimeError
        full = getattr(e, "errno", None) == errno.ENOSPC or "os error 28" in str(e)
        last = latest_state(run)
        raise OSError(f"Could not save {path} ({'no space left on the device' if full else first_line(e)}); free "
                      "space on its disk (a full disk is the usual cause) and rerun with --resume; "
                      + (f"the last saved state is {last}." if last else "no training state was saved.")) from None


@contextlib.contextmanager
def _swap_in(model: MlpMixer, ema: Optional[dict]) -> Iterator[None]:
    """Use the EMA weights inside the block (evaluation, saving), then restore the live ones."""
    if ema is None:
        yield
        return
    live = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(ema)
    try:
        yield
    finally:
        model.load_state_dict(live)


def _append(path: Path, entry: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _kept_metrics(path: Path, start: int) -> Optional[bytes]:
    """What a run starting at step `start` keeps of its metrics.jsonl (None: there is none): a resumed run
    keeps the metrics up to its checkpoint and drops those of the lost steps.

    A last line cut short (a power cut during an append) is dropped with a warning; any other line that is
    not a metrics entry is one sentence naming the file."""
    if not path.exists():
        return None
    lines = [line for line in path.read_bytes().splitlines() if line.strip()] if start else []
    kept = []
    for n, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
            step = entry["step"] if isinstance(entry, dict) else None
        except (ValueError, KeyError):  # not JSON, not UTF-8, or no step
            step = None
        if not isinstance(step, int):
            if n == len(lines):
                warnings.warn(f"{path}: its last line is damaged (cut short?) and was dropped.")
                break
            raise ValueError(f"{path} line {n} is not a metrics entry (a JSON object with a step); delete that "
                             "line and rerun.")
        if step <= start:
            kept.append(line + b"\n")
    return b"".join(kept)


def _validated(metrics: Optional[bytes], step: int) -> bool:
    """Whether the lines `_kept_metrics` kept hold a validation of `step`."""
    entries = (json.loads(line) for line in (metrics or b"").splitlines() if line.strip())
    return any(entry["step"] == step and "val_top1" in entry for entry in entries)


def _latest_run(root: str | Path = "runs") -> Path:
    runs = sorted((p for p in Path(root).glob("*") if latest_state(p)), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"No run under {root}/ has a saved training state; give --out RUN_DIR.")
    return runs[-1]


def launch(r: Recipe, out: Optional[str | Path] = None, **options: Any) -> RunFiles:
    """`train`, in several local CPU processes when that is faster (`r.processes`; None: one per free
    core for in-memory data on a machine without CUDA, unless --cuda-graphs asks for one process).

    Small models spend their steps in many small operations that intra-op threads hardly speed up,
    while processes of one thread each, splitting every global batch and averaging gradients in
    shared memory (`shared_grads`), keep their cores busy: on 2 cores the default job trained 1.1×
    faster in two processes than in one process of two threads (4,640 against 4,190 img/s). The
    processes are forked, so they start at once; this one is rank 0 and its errors surface as usual.
    Results equal a one-process run to float tolerance (same global batch, same augmentation); resume
    a run with the same number of processes for bit-for-bit equality.
    """
    in_memory = r.data == MNIST5K or is_idx_folder(r.data)
    if options.get("resume") and "WORLD_SIZE" not in os.environ:
        # The process and thread counts chosen from the machine's load must not change on resuming:
        # they decide the order of floating-point sums, and so the bits of the result.
        out = Path(out) if out else _latest_run()
        saved = _saved_layout(out)
        r = r.replace(processes=r.processes or saved[0], threads=r.threads or saved[1])
    n = r.processes or (free_cores() if in_memory and not torch.cuda.is_available() and not r.cuda_graphs else 1)
    if n <= 1 or "WORLD_SIZE" in os.environ:
        return train(r, out, **options)
    if out is None:  # every process must write to the same run
        out = _latest_run() if options.get("resume") else new_run_dir()
    r = r.replace(threads=r.threads or 1)
    options = {**options, "shared_grads": SharedGradients(n)}
    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(n)}
    children = [multiprocessing.get_context("fork").Process(target=_child, args=(rank, env, r, out, options))
                for rank in range(1, n)]
    for child in children:
        child.start()
    os.environ.update(env, RANK="0", LOCAL_RANK="0")
    failed = True
    try:
        files = train(r, out, **options)
        failed = False
        return files
    finally:
        for key in (*env, "RANK", "LOCAL_RANK"):
            os.environ.pop(key, None)
        for child in children:
            if failed:  # the others may wait for rank 0 in a collective that never comes
                child.kill()
            child.join()
        options["shared_grads"].close()


def _saved_layout(run: Path) -> tuple[Optional[int], Optional[int]]:
    """(processes, threads per process) an earlier run of `run` used, from its config.json."""
    config = run_config(run)
    if config is None:  # no run there yet: `train` says so
        return None, None
    return config.get("world_size"), config["recipe"].get("threads")


def _child(rank: int, env: dict[str, str], r: Recipe, out: Path, options: dict[str, Any]) -> None:
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    code = 0
    try:
        train(r, out, **{**options, "progress": False, "log": lambda *_: None})
    except Exception as e:
        if interrupt_behind(e) is not None:  # Ctrl-C reaches every process of the group: rank 0 says it
            pass
        elif isinstance(e, (ValueError, OSError)):  # a user error: rank 0 says it (its own, or this one's)
            options["shared_grads"].abort("" if getattr(e, "reported_elsewhere", False) else str(e))
            code = 1
        else:  # a bug: its traceback here, where it happened; rank 0 points to it
            print(f"Training process {rank}:", file=sys.stderr)
            traceback.print_exc()
            options["shared_grads"].abort()
            code = 1
    finally:
        os._exit(code)  # a forked child must not run the parent's exit handlers
