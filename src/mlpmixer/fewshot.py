"""Linear evaluation on frozen features: few-shot (SPEC §4) and a full linear probe.

The recipe is big_vision's, which the paper reports: the pre-logit features (after the final LayerNorm
and mean pooling) of a frozen model, standardised per dimension with an appended constant bias
feature, and an ℓ2-regularised least-squares fit to ±1 one-hot targets, solved in closed form
(ℓ2 = 2¹⁰), over several random draws of the support set.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from tqdm import tqdm

from .choices import FEWSHOT_L2 as DEFAULT_L2
from .choices import FEWSHOT_SHOTS as DEFAULT_SHOTS
from .model import MlpMixer

# Added to each feature's standard deviation so a constant feature does not divide by zero.
STD_EPS = 1e-5
# The constant appended to every example as its bias feature. big_vision's value: large, so that the bias
# weight it needs is tiny and ℓ2 all but leaves it alone (with 1, ℓ2 = 1024 shrank a probe's class priors).
BIAS_FEATURE = 100.0


@dataclass
class LinearProbe:
    """A fitted least-squares classifier: standardisation statistics and weights (bias row last)."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    weight: torch.Tensor  # (D + 1, classes)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        return design_matrix(features, self.mean, self.std) @ self.weight

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.scores(features).argmax(dim=1)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        return (self.predict(features) == labels.to(self.weight.device)).double().mean().item()


def design_matrix(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Standardised features (float64) with a constant column (BIAS_FEATURE) appended for the bias."""
    x = (features.to(mean) - mean) / std
    return torch.cat([x, torch.full_like(x[:, :1], BIAS_FEATURE)], dim=1)


def fit_least_squares(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      l2: float = DEFAULT_L2) -> LinearProbe:
    """argmin_W ‖A·W − Y‖² + l2·‖W‖² with A the standardised features plus a bias column and Y the
    ±1 one-hot targets, in closed form (float64).

    The normal equations are solved in whichever of the two equivalent forms is smaller: the primal
    (AᵀA + l2·I)⁻¹AᵀY when there are more examples than features, else the dual Aᵀ(AAᵀ + l2·I)⁻¹Y —
    few-shot support sets are much smaller than the feature dimension.
    """
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"Expected features (N, D) and labels (N,), got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}.")
    if not 0 < l2 < math.inf:  # NaN too; inf gives zero weights, a classifier of chance accuracy
        raise ValueError(f"The ℓ2 regularisation must be a positive finite number, not {l2}.")
    if len(features) == 0:
        raise ValueError("The least-squares fit needs at least one example; give it some features.")
    if labels.min() < 0 or labels.max() >= num_classes:  # one_hot's own error names no count
        raise ValueError(f"The labels are class indices from 0 to {num_classes - 1} (num_classes {num_classes}), "
                         f"not {int(labels.min())} to {int(labels.max())}.")
    x = features.double()
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False) + STD_EPS
    a = design_matrix(x, mean, std)
    y = 2.0 * torch.nn.functional.one_hot(labels.long().to(a.device), num_classes).double() - 1.0
    n, d = a.shape
    if n >= d:
        gram = a.T @ a + l2 * torch.eye(d, dtype=a.dtype, device=a.device)
        weight = torch.linalg.solve(gram, a.T @ y)
    else:
        gram = a @ a.T + l2 * torch.eye(n, dtype=a.dtype, device=a.device)
        weight = a.T @ torch.linalg.solve(gram, y)
    return LinearProbe(mean, std, weight)


def class_label(c: int, class_names: Sequence[str] | None) -> str:
    """Class `c` in messages: "class 3 (cat)", or "class 3" where the name says no more."""
    named = class_names and c < len(class_names) and class_names[c] != str(c)
    return f"class {c} ({class_names[c]})" if named else f"class {c}"


def sample_support(labels: torch.Tensor, shots: int, num_classes: int, generator: torch.Generator,
                   class_names: Sequence[str] | None = None) -> torch.Tensor:
    """Indices of `shots` examples of every class, drawn at random without replacement."""
    picked = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        if len(members) < shots:
            raise ValueError(
                f"{shots}-shot evaluation needs {shots} image{'s' * (shots != 1)} of every class, but the support "
                f"pool has {len(members)} of {class_label(c, class_names)}; use fewer shots or more data."
            )
        picked.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(picked)


def split_pool(labels: torch.Tensor, eval_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split example indices, class by class, into a support pool and an evaluation set."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"The evaluation fraction must lie strictly between 0 and 1, not {eval_fraction}.")
    generator = torch.Generator().manual_seed(seed)
    pool, held = [], []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_eval = round(len(members) * eval_fraction)
        held.append(members[:n_eval])
        pool.append(members[n_eval:])
    return torch.cat(pool).sort().values, torch.cat(held).sort().values


@dataclass
class ShotResult:
    """Accuracy (a fraction) of each support draw, with their mean and standard deviation."""

    shots: int
    accuracies: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        """The mean accuracy over the draws (NaN before any draw)."""
        return statistics.fmean(self.accuracies) if self.accuracies else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation over the draws (0 for a single draw)."""
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0

    def to_dict(self) -> dict[str, object]:
        return {"mean": self.mean, "std": self.std, "accuracies": self.accuracies}


def fewshot_evaluate(pool_features: torch.Tensor, pool_labels: torch.Tensor,
                     eval_features: torch.Tensor, eval_labels: torch.Tensor,
                     shots: Iterable[int] = DEFAULT_SHOTS, num_classes: int | None = None,
                     l2: float = DEFAULT_L2, draws: int = 3, seed: int = 0,
                     class_names: Sequence[str] | None = None) -> dict[int, ShotResult]:
    """Few-shot linear accuracy on (eval_features, eval_labels) for each shot count (`shots`: counts, or one
    count): `draws` random support sets of that many examples per class from the pool, one least-squares fit each."""
    if isinstance(shots, int):
        shots = [shots]
    if draws < 1:
        raise ValueError(f"Few-shot evaluation needs at least one draw, not {draws}.")
    if len(eval_labels) == 0:  # the accuracy of no images is NaN, which would pass for a result
        raise ValueError("Few-shot evaluation needs at least one evaluation example; give it some.")
    if num_classes is None:
        num_classes = int(max(pool_labels.max(), eval_labels.max())) + 1
    results = {}
    for k in shots:
        if k < 1:
            raise ValueError(f"Shot counts must be positive, not {k}.")
        generator = torch.Generator().manual_seed(seed)
        result = ShotResult(k)
        for _ in range(draws):
            support = sample_support(pool_labels, k, num_classes, generator, class_names)
            probe = fit_least_squares(pool_features[support], pool_labels[support], num_classes, l2)
            result.accuracies.append(probe.accuracy(eval_features, eval_labels))
        results[k] = result
    return results


@torch.inference_mode()
def extract_features(model: MlpMixer, batches: Iterable[Sequence[Any]],
                     device: torch.device | str | None = None, desc: str = "features",
                     total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen pre-logit features (N, C) and labels (N,) of every (images, labels) batch in `batches`
    (a DataLoader or any iterable); `total` images, when known, for the progress bar. The features are
    mean-pooled over the tokens, as the paper's are, also for a model whose head classifies every token
    (`global_pool=""`). Features that are not finite (a damaged or diverged model) are refused. Batches of
    (images, labels, names) give them in the order of the names, whatever order the batches came in (as
    from DataLoader workers reading shards: `ShardDataset.keyed`)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if total is None:  # a DataLoader over a dataset of known size still gives the bar its total
        try:
            total = len(batches.dataset)  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            pass
    was_training = model.training
    model.eval()
    feats, labels, names = [], [], []
    try:
        with tqdm(total=total, desc=desc, unit="img", disable=None) as bar:
            for images, targets, *batch_names in batches:
                x = model.forward_head(model.forward_features(images.to(device, non_blocking=True)), pre_logits=True)
                feats.append((x.mean(1) if x.ndim == 3 else x).float().cpu())  # (B, S, C): a per-token head's
                labels.append(torch.as_tensor(targets).long())
                names += batch_names[0] if batch_names else []
                bar.update(len(labels[-1]))
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("The data source yielded no images; check the path.")
    bad = sum(int((~f.isfinite()).any(1).sum()) for f in feats)
    if bad:  # NaN scores all argmax to class 0: a chance accuracy that would pass for a result
        raise ValueError(f"The model's features of {bad} of the {sum(len(f) for f in feats)} images are not finite "
                         "(NaN or infinite): its weights are damaged or its training diverged; check it with "
                         "mixer eval.")
    if not names:
        return torch.cat(feats), torch.cat(labels)
    order = sorted(range(len(names)), key=names.__getitem__)
    return torch.cat(feats)[order], torch.cat(labels)[order]
