"""MLP-Mixer (Tolstikhin et al., 2021), as in SPEC §1, with activations kept tokens-first.

Activations flow as (S, B, C): tokens, batch, channels. Token mixing is then one plain GEMM
W1 · X.view(S, B·C) and channel mixing one plain GEMM X.view(S·B, C) · W3ᵀ, with no transposes
between the two (SPEC §1 measured this layout 1.3-1.4× faster than timm's (B, S, C) one).

Parameter names follow timm's `MlpMixer`, so a timm state dict loads as it is; the official Flax
layout is mapped in `checkpoints.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .variants import TIMM_RENAMED, MixerConfig, as_pair, timm_name, variant_config


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Flax's default kernel init: truncated normal (±2σ) with variance 1/fan_in.

    PyTorch's init module has no LeCun-normal; 0.8796... is the std of a unit normal truncated to
    ±2, which the truncation would otherwise shrink the variance by.
    """
    fan_in = weight[0].numel()  # Linear (out, in) -> in; Conv (out, in, kh, kw) -> in·kh·kw
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    # Since torch 2.12 this draws by rejection, slow for the largest models (H/14: about a minute on 2 cores). The
    # inverse CDF is as exact at ±2σ and 8× faster, but draws other values for a seed, and the default recipe
    # was chosen under these: with those its MNIST test accuracy fell to 98.34% (seeds 0-2; target 98.5%).
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for this device type; False for one autocast does not know (the meta device,
    where shapes are worked out without data), whose query raises."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


class DropPath(nn.Module):
    """Stochastic depth on a (S, B, C) residual branch: drops whole samples (dim 1)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        if keep == 0.0:  # every sample dropped (as timm does): scaling by 1 / keep would make 0 / 0
            return torch.zeros_like(x)
        # Scaled on the small mask, so the activation is read and written once, forward and backward.
        mask = x.new_empty(1, x.shape[1], 1).bernoulli_(keep).div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"rate={self.rate:g}"


def _dropout(rate: float) -> nn.Module:
    """Dropout, or nothing at rate 0 (the paper's setting): 33 calls fewer per forward of Mixer-nano,
    host time that a small model's training step on a GPU may be bound by."""
    return nn.Dropout(rate) if rate > 0 else nn.Identity()


class TokenMixingMlp(nn.Module):
    """W2 · GELU(W1 · X + b1) + b2 over the token axis, shared across channels."""

    def __init__(self, tokens: int, hidden: int, act: nn.Module, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(tokens, hidden)  # weight (D_S, S)
        self.fc2 = nn.Linear(hidden, tokens)  # weight (S, D_S)
        self.act = act
        self.drop = _dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b, c = x.shape
        h = torch.addmm(self.fc1.bias[:, None], self.fc1.weight, x.reshape(s, b * c))
        h = self.drop(self.act(h))
        out = torch.addmm(self.fc2.bias[:, None], self.fc2.weight, h)
        return self.drop(out).view(s, b, c)


class ChannelMixingMlp(nn.Module):
    """GELU(X · W3 + b3) · W4 + b4 over the channel axis, shared across tokens."""

    def __init__(self, dim: int, hidden: int, act: nn.Module, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = act
        self.drop = _dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class MixerBlock(nn.Module):
    def __init__(self, config: MixerConfig, drop_path: float) -> None:
        super().__init__()
        c = config.hidden_dim
        act = nn.GELU(approximate="tanh" if config.gelu == "tanh" else "none")
        self.norm1 = nn.LayerNorm(c, eps=1e-6)
        self.mlp_tokens = TokenMixingMlp(config.num_tokens, config.tokens_mlp_dim, act, config.proj_drop_rate)
        self.norm2 = nn.LayerNorm(c, eps=1e-6)
        self.mlp_channels = ChannelMixingMlp(c, config.channels_mlp_dim, act, config.proj_drop_rate)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (S, B, C) -> (S, B, C)
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x)))
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


class PatchEmbed(nn.Module):
    """The stem: a P×P convolution with stride P, computed as one GEMM that writes (S, B, C).

    The weight keeps the convolution's shape (C, in, P, P), as in timm and torch checkpoints.
    """

    def __init__(self, config: MixerConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.proj = nn.Conv2d(
            config.in_chans, config.hidden_dim, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) -> (S, B, C)
        b, cin, h, w = x.shape
        ph, pw = self.patch_size
        gh, gw = h // ph, w // pw
        # Gather patches token-major; each patch flattened as (in, ph, pw) like the conv weight.
        patches = x.reshape(b, cin, gh, ph, gw, pw).permute(2, 4, 0, 1, 3, 5).reshape(gh * gw, b, cin * ph * pw)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


def checked_pool(global_pool: str) -> str:
    """timm's `global_pool` of a Mixer: "avg" (the paper's mean over tokens) or "" (none: the head sees every token)."""
    if global_pool not in ("avg", ""):
        raise ValueError(f"A Mixer pools its tokens by the mean ('avg') or not at all (''); global_pool="
                         f"{global_pool!r} is not supported.")
    return global_pool


class MlpMixer(nn.Module):
    """An MLP-Mixer with timm's model API (`forward_features`, `forward_head`, `reset_classifier`)."""

    def __init__(self, config: MixerConfig, global_pool: str = "avg") -> None:
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.num_features = self.head_hidden_size = config.hidden_dim
        self.global_pool = checked_pool(global_pool)
        self.grad_checkpointing = False
        self.class_names: list[str] | None = None  # saved with our checkpoints, printed by `predict`
        self.stem = PatchEmbed(config)
        n = config.num_blocks
        # Stochastic depth rises linearly from 0 at the first block to the rate at the last.
        rates = [config.drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        self.blocks = nn.Sequential(*[MixerBlock(config, r) for r in rates])
        self.norm = nn.LayerNorm(config.hidden_dim, eps=1e-6)
        self.head_drop = _dropout(config.drop_rate)
        self.head = self._new_head(config.num_classes)
        self.init_weights()
        # Stored, as timm's, so that an edit (say of the mean) reaches timm.data.resolve_data_config.
        self.pretrained_cfg = self._input_cfg()

    def _new_head(self, num_classes: int) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        head = nn.Linear(self.config.hidden_dim, num_classes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return head

    @torch.no_grad()
    def init_weights(self) -> None:
        """Flax defaults (SPEC §1): LeCun-normal kernels, zero biases, zero head."""
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                if name == "head":
                    nn.init.zeros_(module.weight)
                else:
                    lecun_normal_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @torch.jit.unused  # its messages need the config, which TorchScript cannot hold: a scripted model skips it
    def check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{cfg.describe()} takes a torch tensor of images, got a {type(x).__name__}; "
                             "convert it first, e.g. torch.from_numpy(x) for a NumPy array.")
        if not x.is_floating_point():
            raise ValueError(f"{cfg.describe()} takes float images (pixels scaled to [-1, 1]), got {x.dtype}; "
                             "convert them first, e.g. x.float() / 127.5 - 1 for 0-255 pixels.")
        weights = self.stem.proj.weight.dtype
        # Autocast casts every float tensor but a float64 one to its own dtype, so only that mix fails there.
        autocast = autocast_enabled(x.device.type) and torch.float64 not in (x.dtype, weights)
        if x.dtype != weights and not autocast:
            raise ValueError(f"{cfg.describe()} got {x.dtype} images for a {weights} model; convert the images "
                             f"with x.to({weights}) or the model with model.to({x.dtype}).")
        if x.ndim != 4 or x.shape[1] != cfg.in_chans:
            raise ValueError(
                f"{cfg.describe()} takes images shaped (batch, {cfg.in_chans}, height, width), "
                f"got a tensor of shape {tuple(x.shape)}."
            )
        if tuple(x.shape[-2:]) != cfg.img_size:
            (h, w), (gh, gw), (ph, pw) = cfg.img_size, x.shape[-2:], cfg.patch_size
            if gh % ph == 0 and gw % pw == 0 and (gh // ph) * (gw // pw) == cfg.num_tokens:
                # .npz and timm files carry no image size: a 4×9 grid's 36 tokens load as a 6×6 one.
                raise ValueError(
                    f"{cfg.describe()} takes {h}×{w} images, got {gh}×{gw}, which have as many patches: if the "
                    f"weights came from a .npz or timm file (they carry no image size), load them with "
                    f"img_size=({gh}, {gw}) (or convert them once: mixer convert FILE OUT.safetensors --img-size "
                    f"{gh} {gw}); otherwise resize the images to {h}×{w}."
                )
            raise ValueError(
                f"{cfg.describe()} takes {h}×{w} images, got {gh}×{gw}: resize the images to {h}×{w}, "
                "or convert the model to the new resolution first with mlpmixer.resize_to(model, size) "
                "(`mixer resize` on the command line)."
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in, H, W) -> normalised token features (B, S, C)."""
        if not torch.jit.is_scripting():
            self.check_input(x)
        x = self.stem(x)
        # Gradient checkpointing is eager PyTorch's (torch.jit.script(model) compiles the branch away).
        if not torch.jit.is_scripting() and self.grad_checkpointing and self.training and torch.is_grad_enabled():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        # Contiguous, as timm's: a transposed view of the (S, B, C) stream would fail `.view()` in user code.
        return self.norm(x).transpose(0, 1).contiguous()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Token features (B, S, C) -> logits (B, classes), or pooled features if `pre_logits`; with
        global_pool "" the tokens are not pooled: logits (B, S, classes), features (B, S, C)."""
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head by a zero-initialised one for `num_classes` (0: no head). `global_pool` is
        timm's: "avg" pools the tokens by their mean, "" not at all (None keeps the model's)."""
        # Both checked before either changes: a refused call leaves the model as it was.
        config = self.config.replace(num_classes=num_classes)
        self.global_pool = checked_pool(self.global_pool if global_pool is None else global_pool)
        self.config = config
        self.num_classes = num_classes
        self.pretrained_cfg["num_classes"] = num_classes
        self.class_names = None  # the old names belong to the old head
        ref = self.stem.proj.weight  # not the norm's: prune_intermediate_layers may have removed it
        self.head = self._new_head(num_classes).to(device=ref.device, dtype=ref.dtype)
        self.head.train(self.training)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    # -- the rest of timm's model API, for tools built on it (timm.data, timm.optim's layer decay) --------

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The outputs of some blocks, as timm's: `indices` an int takes the last n blocks, a sequence
        those blocks (negative ones count from the end), None all. Each is (B, C, H', W') over the patch
        grid for "NCHW", or (B, S, C) tokens for "NLC", after the final LayerNorm if `norm`. Returns
        (final features (B, S, C), intermediates), or only the intermediates. `stop_early` skips the
        blocks after the last one taken: the final features are then the normalised output of that block."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', not {output_fmt!r}.")
        take = self._block_indices(indices)
        self.check_input(x)
        (h, w), (ph, pw) = self.config.img_size, self.config.patch_size
        x = self.stem(x)  # (S, B, C)
        last = max(take) if stop_early else len(self.blocks) - 1
        intermediates = []
        for i, block in enumerate(self.blocks[: last + 1]):
            x = block(x)
            if i in take:
                y = (self.norm(x) if norm else x).transpose(0, 1)  # (B, S, C)
                if output_fmt == "NCHW":
                    y = y.reshape(x.shape[1], h // ph, w // pw, -1).permute(0, 3, 1, 2)
                intermediates.append(y.contiguous())
        if intermediates_only:
            return intermediates
        return self.norm(x).transpose(0, 1).contiguous(), intermediates

    def _block_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        """timm's block selection, checked: an int the last n blocks, a sequence those (negative ones count
        from the end), None all."""
        n = len(self.blocks)
        if indices is None:
            indices = n
        if isinstance(indices, int):
            if not 0 < indices <= n:
                raise ValueError(f"{self.config.describe()} has {n} blocks: indices={indices} must be in 1..{n}.")
            return list(range(n - indices, n))
        take = [i + n if i < 0 else i for i in indices]
        if not all(0 <= i < n for i in take):
            raise ValueError(f"{self.config.describe()} has {n} blocks: indices {list(indices)} must be in "
                             f"{-n}..{n - 1}.")
        return take

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """As timm's: drop the blocks after the last of `indices` (chosen as in `forward_intermediates`),
        the final LayerNorm if `prune_norm` (an identity then) and the head and pooling if `prune_head`.
        Returns the block indices taken. The config follows the blocks; a model without its norm is for
        feature extraction, and `save_checkpoint` refuses it (a file of it would not load back)."""
        take = self._block_indices(indices)
        self.blocks = self.blocks[: max(take) + 1]
        self.config = self.config.replace(num_blocks=len(self.blocks))
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's description of the taps of `forward_intermediates`: one per block, at the patch stride."""
        channels, stride = self.config.hidden_dim, self.config.patch_size[0]
        return [dict(num_chs=channels, reduction=stride, module=f"blocks.{i}") for i in range(len(self.blocks))]

    def _input_cfg(self) -> dict[str, Any]:
        """The input this model expects, in timm's keys, so that `timm.data.resolve_data_config(model=...)`
        builds its transforms: pixels to [-1, 1] (mean and std 0.5; MIIL weights are folded to take the
        same, see `pretrained.fold_input_normalisation`) and the official "resize" evaluation (SPEC §4)."""
        c, (h, w) = self.config.in_chans, self.config.img_size
        # architecture: timm's name for these shapes, so that timm's tools that save a model's configuration
        # (timm.models.push_to_hf_hub) name the model timm builds for these weights; ours where timm has none.
        return dict(architecture=timm_name(self.config) or self.config.describe(), input_size=(c, h, w),
                    fixed_input_size=True, num_classes=self.num_classes, mean=(0.5,) * c, std=(0.5,) * c,
                    interpolation="bilinear", crop_pct=1.0, crop_mode="squash", first_conv="stem.proj",
                    classifier="head")

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of `pretrained_cfg`: the same dict."""
        return self.pretrained_cfg

    # Read from the config, which TorchScript cannot hold: torch.jit.script(model) leaves them out.
    __jit_unused_properties__ = ["feature_info", "default_cfg"]

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise learning-rate decay: the stem, each block, then the norm."""
        return dict(stem=r"^stem", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])


def create_model(
    name: str | MixerConfig = "B/16",
    pretrained: str | bool | None = None,
    *,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    global_pool: str = "avg",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> MlpMixer:
    """Build a Mixer by variant name ('B/16', 'Mixer-B_16', 'mixer_b16_224', ...) or config.

    The arguments are timm's: `pretrained` second, the rest by keyword. `num_classes` defaults to
    1000, or to the checkpoint's classes with `pretrained`; any other field of `MixerConfig` can be
    overridden (hidden_dim, num_blocks, patch_size, gelu, ...). `pretrained` names a published
    checkpoint (see `mlpmixer.pretrained.available()`); a different `num_classes` then gives a new
    zero-initialised head, ready for fine-tuning. As in timm, a name may carry the tag
    ('mixer_b16_224.goog_in21k') that pretrained=True then loads; without it the tag still gives the head its
    weights' classes (an unknown tag is an error, as in timm); False is None. `global_pool` "" gives
    the head every token (logits (B, S, classes)) instead of their mean. `device` and `dtype` as in timm:
    the model is built on that device (the meta device: shapes only) and cast to that dtype.
    """
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(MixerConfig)})
    if unknown:
        fields = ", ".join(f.name for f in dataclasses.fields(MixerConfig)
                           if f.name not in ("name", "num_classes", "img_size"))
        hint = " (gelu='exact' or 'tanh' sets the activation)" if "act_layer" in unknown else ""
        raise ValueError(f"create_model does not take {', '.join(unknown)}{hint}; it takes num_classes, img_size, "
                         f"global_pool, device, dtype and the configuration's fields: {fields}.")
    if isinstance(name, str) and name.strip().lower() in TIMM_RENAMED:  # timm still builds its old names
        name = TIMM_RENAMED[name.strip().lower()]
    if not (pretrained is None or isinstance(pretrained, (str, bool))):
        raise ValueError(f"create_model's second argument is pretrained (a tag, True or False), as in timm, not "
                         f"{pretrained!r}; give the classes by keyword: num_classes={pretrained!r}.")
    checked_pool(global_pool)
    if isinstance(name, str) and "." in name:  # timm's "model.tag"
        name, tag = name.split(".", 1)
        if pretrained is True:
            pretrained = tag
        elif num_classes is None:  # as in timm, a tag names the head even without its weights (21,843 for goog_in21k)
            from .pretrained import find_weights

            num_classes = find_weights(name, tag).num_classes
    if pretrained is True:
        raise ValueError("pretrained=True needs the weights named: pretrained='TAG', or a name such as "
                         "'mixer_b16_224.goog_in21k'; mlpmixer.available() lists the tags.")
    with torch.device(device) if device is not None else contextlib.nullcontext():  # initialised there
        model = _build(name, pretrained, num_classes, img_size, global_pool, overrides)
    # Published weights are read on the CPU whatever the device context: moved here.
    return model if device is None and dtype is None else model.to(device=device, dtype=dtype)


def _build(name: str | MixerConfig, pretrained: str | bool | None, num_classes: int | None,
           img_size: int | tuple[int, int] | None, global_pool: str, overrides: dict[str, Any]) -> MlpMixer:
    if pretrained:
        from .pretrained import load_pretrained

        model = load_pretrained(name if isinstance(name, str) else name.describe(), pretrained, **overrides)
        if img_size is not None and model.config.img_size != as_pair(img_size):
            raise ValueError(
                f"The {pretrained} weights of {model.config.describe()} are for "
                f"{model.config.img_size[0]}×{model.config.img_size[1]} images; load them at that size, "
                "then convert with mlpmixer.resize_to(model, size)."
            )
        if num_classes is not None and num_classes != model.num_classes:
            model.reset_classifier(num_classes)
        model.global_pool = global_pool
        return model
    if img_size is not None:
        overrides["img_size"] = img_size
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if isinstance(name, MixerConfig):
        config = name.replace(**overrides)
    else:
        config = variant_config(name, **overrides)
    return MlpMixer(config, global_pool)

