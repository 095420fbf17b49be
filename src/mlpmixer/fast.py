"""The fast path: `optimize(model)` runs an `MlpMixer` with fused operations, sharing its parameters.

What it changes against the plain `model.forward` (same function, same parameters):

Inference (no gradients)
  - Each residual branch ends in an in-place GEMM, `r.addmm_(W, h)`: the residual add happens in
    the GEMM's β=1 epilogue. The branch's output bias is not added there: the biases accumulate in
    a per-token and a per-channel vector that the next LayerNorm adds in fp32 (float64 for float64)
    while it reads the stream (`kernels.layer_norm`), so residual adds and output biases cost no memory pass.
  - The first product of each MLP carries its bias and GELU in the epilogue (`kernels.linear_act`:
    a Triton GEMM in bf16/fp16; in fp32, cuBLASLt for the tanh GELU and GEMM then GELU otherwise).
  - On CUDA, one CUDA graph per input shape replays the whole forward (no launch overhead).
  - On the CPU the stream is image-major, (B, S, C), and token mixing a batched product per
    image, which MKL runs faster than one product over all B·C columns (`_features_infer_cpu`).
    With AVX-512 the channel MLP's products go through oneDNN, whose epilogues take the GELU and
    the residual add (`kernels.cpu_linear_act`, `kernels.cpu_linear_add_`).

Training
  - Each residual branch is one autograd.Function that saves only its input, the LayerNorm's
    statistics and the GELU's input; in the backward it recomputes the LayerNorm output and the
    GELU output (cheap, memory-bound) instead of storing them, which halves the activation memory.
    The GELU's recomputation and derivative are one fused pass (`kernels.gelu_fwd_bwd`). On the
    CPU, where that pass is not fused, the GELU output is stored instead (`kernels.gelu_stored`).

Under autocast the products run in the autocast dtype with fp32 accumulation, as in the plain path;
LayerNorm statistics are fp32 (float64 for a float64 model, which runs in float64 throughout). Dropout and stochastic depth in training are not fused: with either
active the plain path runs (one warning).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import kernels as K
from .model import MlpMixer, autocast_enabled

EPS = 1e-6  # the model's LayerNorm epsilon (SPEC §1)


def compute_dtype(x: torch.Tensor, model: MlpMixer) -> tuple[torch.dtype, bool]:
    """(dtype the products run in, whether autocast chose it)."""
    device = x.device.type
    weights = model.stem.proj.weight.dtype  # not the norm's: prune_intermediate_layers may have removed it
    # Autocast leaves float64 alone (the plain path runs a float64 model in float64 under it), and so do we.
    if autocast_enabled(device) and weights != torch.float64:
        return torch.get_autocast_dtype(device), True
    return weights, False


def _functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


class FastPathWarning(UserWarning):
    """The fast path's warnings, which point at the caller's line (`_callers_stacklevel`): `mixer` still says
    them as its own, whose caller is the package's code or its entry script."""


def _callers_stacklevel() -> int:
    """warnings.warn's stacklevel for the first frame outside mlpmixer and torch that leads to the caller: the
    user's call of the model, below nn.Module's call machinery (how deep that is varies with torch's version).
    Pointed at a line in here, Python's once-per-place filter let one wrapper warn and silenced the next one's."""
    inside = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1  # the caller of this function: stacklevel 1 of its warnings.warn
    while frame.f_back is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _autocast(device: str, dtype: torch.dtype, on: bool):
    """The caller's autocast again, without its weight cache (a CUDA graph must not point into it)."""
    return torch.autocast(device, dtype=dtype, cache_enabled=False) if on else contextlib.nullcontext()


class _TokenBranch(torch.autograd.Function):
    """x + W2 · GELU(W1 · LN(x) + b1) + b2 on a (S, B, C) stream, storing x, LN stats and W1·LN(x)+b1 (and
    on the CPU its GELU: `kernels.gelu_stored`)."""

    @staticmethod
    def forward(ctx, x, g, beta, w1, b1, w2, b2, act):  # type: ignore[override]
        s, b, c = x.shape
        y, mean, rstd = K.layer_norm_train(x, g, beta, EPS)
        pre = torch.addmm(b1[:, None], w1, y.view(s, b * c))  # (D_S, B·C)
        h = K.gelu(pre, act)
        out = torch.addmm(x.view(s, b * c), w2, h)  # residual add in the GEMM epilogue
        out += b2[:, None]
        ctx.save_for_backward(x, mean, rstd, g, beta, w1, w2, pre, h if K.gelu_stored(pre) else None)
        ctx.act = act
        return out.view(s, b, c)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, mean, rstd, g, beta, w1, w2, pre, h = ctx.saved_tensors
        s, b, c = x.shape
        go = grad.contiguous().view(s, b * c)
        h, dpre = K.gelu_fwd_bwd(pre, torch.mm(w2.t(), go), ctx.act, h)
        dw2 = torch.mm(go, h.t())
        db2 = go.sum(1)
        db1 = dpre.sum(1)
        y = K.layer_norm_train(x, g, beta, EPS, mean, rstd)[0]  # recomputed, not stored
        dw1 = torch.mm(dpre, y.view(s, b * c).t())
        dy = torch.mm(w1.t(), dpre).view(s, b, c)
        dx, dg, dbeta = K.layer_norm_backward(dy, x, mean, rstd, g, beta, go.view(s, b, c))
        return dx, dg, dbeta, dw1, db1, dw2, db2, None


class _ChannelBranch(torch.autograd.Function):
    """x + GELU(LN(x) · W3ᵀ + b3) · W4ᵀ + b4 on a (S, B, C) stream, storing as `_TokenBranch`."""

    @staticmethod
    def forward(ctx, x, g, beta, w3, b3, w4, b4, act):  # type: ignore[override]
        c = x.shape[-1]
        x2 = x.view(-1, c)
        y, mean, rstd = K.layer_norm_train(x2, g, beta, EPS)
        # The products through oneDNN on CPUs with AVX-512 (kernels.onednn_usable), else torch.addmm / mm.
        pre = K.cpu_linear_act(y, w3, b3, "none")  # (S·B, D_C)
        h = K.gelu(pre, act)
        # The bias in the GEMM's epilogue (cuBLASLt), then the residual: one pass fewer than
        # addmm(x2, ...), which first copies x2 into the output.
        out = K.cpu_linear_act(h, w4, b4, "none")
        out += x2
        ctx.save_for_backward(x, mean, rstd, g, beta, w3, w4, pre, h if K.gelu_stored(pre) else None)
        ctx.act = act
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, mean, rstd, g, beta, w3, w4, pre, h = ctx.saved_tensors
        c = x.shape[-1]
        x2 = x.view(-1, c)
        go = grad.contiguous().view(-1, c)
        h, dpre = K.gelu_fwd_bwd(pre, K.cpu_linear_act(go, w4.t(), None, "none"), ctx.act, h)
        dw4 = torch.mm(go.t(), h)  # oneDNN was no faster than MKL for the weights' gradients
        db4 = K.column_sums(go)
        db3 = K.column_sums(dpre)
        y = K.layer_norm_train(x2, g, beta, EPS, mean, rstd)[0]
        dw3 = torch.mm(dpre.t(), y)
        dy = K.cpu_linear_act(dpre, w3.t(), None, "none")
        dx, dg, dbeta = K.layer_norm_backward(dy, x2, mean, rstd, g, beta, go)
        return dx.view(x.shape), dg, dbeta, dw3, db3, dw4, db4, None


def _drop_model_prefix(wrapper: nn.Module, state: dict[str, Any], prefix: str, local_metadata: dict) -> None:
    """A state dict hook of FastMixer: its keys `prefix + "model." + name` become `prefix + name`."""
    inner = prefix + "model."
    for key in [k for k in state if k.startswith(inner)]:
        state[prefix + key[len(inner):]] = state.pop(key)


def _add_model_prefix(state: dict[str, Any], prefix: str, *_: Any) -> None:
    """A load_state_dict pre-hook of FastMixer: the model's names go to the wrapped model. Keys that
    already start with "model." (a FastMixer's state dict before it dropped the prefix) stay as they are."""
    for key in [k for k in state if k.startswith(prefix) and not k.startswith(prefix + "model.")]:
        state[prefix + "model." + key[len(prefix):]] = state.pop(key)


class FastMixer(nn.Module):
    """An `MlpMixer` run through the fast path; `self.model` is the wrapped model (shared, not copied).

    `cuda_graphs`: replay inference on CUDA from one CUDA graph per input shape and dtype.
    `gemm`: the first product's epilogue backend, see `kernels.linear_act` ("auto" picks).

    The rest of the model's API (timm's included) works on the wrapper, and its state dict is the model's.
    Change the weights in place under `torch.no_grad()` (as `load_state_dict` and optimisers do), not through
    `.data`: bf16 CPU inference keeps packed copies while a parameter's version counter stays the same
    (`kernels.packed_weight`), and `.data` edits do not move it.
    `torch.compile` does not trace the fast path (its Triton kernels, first-use checks, in-place products
    and CUDA graphs): a compiled FastMixer compiles and runs the plain `model.forward`. Use one or the
    other: `optimize(model)`, or `torch.compile(model)`.
    """

    def __init__(self, model: MlpMixer, cuda_graphs: bool = True, gemm: str = "auto") -> None:
        super().__init__()
        if not isinstance(model, MlpMixer):
            kind = f"{type(model).__module__}.{type(model).__qualname__}"  # timm's Mixer is an MlpMixer too
            raise TypeError(f"optimize() takes an mlpmixer.model.MlpMixer, not a {kind}; a timm Mixer's "
                            "weights, saved with torch.save(model.state_dict(), PATH), load into one with "
                            "mlpmixer.load_checkpoint(PATH).")
        self.model = model
        self.training = model.training  # the wrapper starts in the model's mode
        self.cuda_graphs = cuda_graphs
        self.gemm = gemm
        self._graphs: dict = {}
        self._graph_params: tuple = ()
        self._warned_plain = False
        # The state dict is the model's, under the model's names (no "model." prefix): a fast model's
        # weights load into a plain one, into timm's and with load_checkpoint, and theirs into it.
        self._register_state_dict_hook(_drop_model_prefix)
        self._register_load_state_dict_pre_hook(_add_model_prefix)

    def __getattr__(self, name: str) -> Any:
        """What nn.Module does not find on the wrapper (num_classes, pretrained_cfg, get_classifier, ...) is
        the wrapped model's: timm's tools and ours then take a FastMixer as they take the model."""
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules, `model` among them
        except AttributeError:
            if name == "model":  # not set yet (while unpickling or deep-copying): no recursion
                raise
            return getattr(self.model, name)

    # Where the model's API names parameters or submodules, the wrapper's names are "model." + the model's.

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The model's parameter groups (timm's layer-wise learning-rate decay), for the wrapper's names."""
        def inside(pattern: str) -> str:
            return r"^model\." + pattern.removeprefix("^")

        return {group: inside(rule) if isinstance(rule, str) else [(inside(p), order) for p, order in rule]
                for group, rule in self.model.group_matcher(coarse).items()}

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """The model's `feature_info`, its modules named as the wrapper's `named_modules()` names them."""
        return [dict(info, module="model." + info["module"]) for info in self.model.feature_info]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """The model's `reset_classifier`; the CUDA graphs, captured with the old head, go with it (the
        new head may reuse the old one's memory, which the graphs' parameter check would not notice)."""
        self.model.reset_classifier(num_classes, global_pool)
        self.reset_graphs()

    def _needs_plain(self) -> bool:
        cfg = self.model.config
        if not isinstance(self.model.norm, nn.LayerNorm):  # pruned away (prune_intermediate_layers): fused in here
            return True
        regularised = cfg.drop_rate > 0 or cfg.proj_drop_rate > 0 or cfg.drop_path_rate > 0
        if self.model.training and regularised:  # the model's mode: model.train() after wrapping counts
            if not self._warned_plain:
                self._warned_plain = True
                warnings.warn(
                    "The fast path does not fuse dropout or stochastic depth; training runs on the plain path.",
                    FastPathWarning, stacklevel=_callers_stacklevel(),
                )
            return True
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, features_only=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in, H, W) -> normalised token features (B, S, C), as `MlpMixer.forward_features`."""
        return self._run(x, features_only=True)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.model.forward_head(x, pre_logits)

    def _run(self, x: torch.Tensor, features_only: bool) -> torch.Tensor:
        model = self.model
        # The plain model where the fast path cannot run: under tracing or compilation (see the class), inside a
        # torch.func transform (its autograd.Functions have no functorch rules), on the meta device (no data).
        if self._needs_plain() or torch.jit.is_tracing() or torch.compiler.is_compiling() or _functorch_active() \
                or x.device.type == "meta":
            return model.forward_features(x) if features_only else model(x)
        model.check_input(x)
        dtype, autocast = compute_dtype(x, model)
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in model.parameters())):
            return self._finish(self._features_train(x, dtype, autocast), dtype, autocast, features_only)
        if x.is_cuda and self.cuda_graphs:
            return self._forward_graphed(x, dtype, autocast, features_only)
        return self._infer(x, dtype, autocast, features_only)

    def _finish(self, feats: torch.Tensor, dtype: torch.dtype, autocast: bool, features_only: bool) -> torch.Tensor:
        """Token features (B, S, C), maybe a transposed view, -> contiguous features or logits."""
        if features_only:
            return feats.contiguous()
        with _autocast(feats.device.type, dtype, autocast):  # the mean pools the view: no copy needed
            return self.model.forward_head(feats)

    # -- inference ------------------------------------------------------------------------------

    def _features_infer(self, x: torch.Tensor, dtype: torch.dtype, autocast: bool) -> torch.Tensor:
        if x.device.type == "cpu" and not K.interpreting():
            return self._features_infer_cpu(x, dtype, autocast)
        model, act = self.model, self.model.config.gelu
        dev = x.device.type
        # The stem and the head are the plain model's code, under the caller's autocast.
        with _autocast(dev, dtype, autocast):
            r = model.stem(x)  # (S, B, C)
        s, b, c = r.shape
        row_bias: Optional[torch.Tensor] = None  # pending output biases, added by the next LayerNorm
        col_bias: Optional[torch.Tensor] = None
        with torch.autocast(dev, enabled=False):
            for blk in model.blocks:
                tok, chan = blk.mlp_tokens, blk.mlp_channels
                y = K.layer_norm(r, row_bias, col_bias, blk.norm1.weight, blk.norm1.bias, EPS, r.dtype)
                h = K.linear_act(
                    tok.fc1.weight.to(dtype), y.view(s, b * c), tok.fc1.bias.to(dtype), True, act, self.gemm
                )
                r.view(s, b * c).addmm_(tok.fc2.weight.to(dtype), h)
                b2 = tok.fc2.bias.to(K.accumulation_dtype(r.dtype))
                row_bias = b2 if row_bias is None else row_bias + b2

                y = K.layer_norm(r, row_bias, col_bias, blk.norm2.weight, blk.norm2.bias, EPS, r.dtype)
                h = K.linear_act(
                    y.view(s * b, c), chan.fc1.weight.to(dtype).t(), chan.fc1.bias.to(dtype), False, act, self.gemm
                )
                r.view(s * b, c).addmm_(h, chan.fc2.weight.to(dtype).t())
                b4 = chan.fc2.bias.to(K.accumulation_dtype(r.dtype))
                col_bias = b4 if col_bias is None else col_bias + b4
            norm = model.norm
            # As in the plain path under autocast, the final LayerNorm's output stays fp32.
            feats = K.layer_norm(r, row_bias, col_bias, norm.weight, norm.bias, EPS, torch.float32 if autocast else dtype)
        return feats.transpose(0, 1)

    def _features_infer_cpu(self, x: torch.Tensor, dtype: torch.dtype, autocast: bool) -> torch.Tensor:
        """Inference on the CPU, where the stream is kept image-major, (B, S, C).

        Token mixing then runs as one batched product per image, W1 · X[b] with X[b] of (S, C),
        instead of one product with all B·C columns: on this project's AVX2 machine MKL ran these
        shapes about 15% faster (B/16, batch 8), and the Mixer's CPU inference as a whole about 5%.
        The residual adds stay in the products' β=1 epilogues; the output biases are added in
        place (there is no fused LayerNorm on the CPU to take them). On CPUs with AVX-512 the channel
        MLP's products go through oneDNN, the GELU and the residual add in their epilogues
        (`kernels.onednn_usable` says why), in bf16 with weights packed once for oneDNN
        (`kernels.packed_weight`, which says when they are packed again).
        """
        model, act = self.model, self.model.config.gelu
        with _autocast("cpu", dtype, autocast):
            r = model.stem(x).transpose(0, 1).contiguous()  # (B, S, C)
        b, s, c = r.shape
        cfg = model.config
        # The hidden activations of every block reuse two buffers: fresh ones each time cost page faults.
        h_tok = r.new_empty(b, cfg.tokens_mlp_dim, c)
        onednn = K.onednn_usable(r)
        h_chan = None if onednn else r.new_empty(b * s, cfg.channels_mlp_dim)  # oneDNN makes its own
        with torch.autocast("cpu", enabled=False):
            for blk in model.blocks:
                tok, chan = blk.mlp_tokens, blk.mlp_channels
                y = K.layer_norm(r, None, None, blk.norm1.weight, blk.norm1.bias, EPS, r.dtype)
                w1 = tok.fc1.weight.to(dtype).expand(b, -1, -1)  # a view: one weight for every image
                K.gelu_(torch.baddbmm(tok.fc1.bias.to(dtype)[:, None], w1, y, out=h_tok), act)
                r.baddbmm_(tok.fc2.weight.to(dtype).expand(b, -1, -1), h_tok)
                r += tok.fc2.bias.to(dtype)[:, None]

                y = K.layer_norm(r, None, None, blk.norm2.weight, blk.norm2.bias, EPS, r.dtype)
                w3, w4 = chan.fc1.weight, chan.fc2.weight
                packed3, packed4 = (K.packed_weight(w, dtype, b * s) if onednn else None for w in (w3, w4))
                h = K.cpu_linear_act(y.view(b * s, c), w3, chan.fc1.bias.to(dtype), act, h_chan, packed3)
                r = K.cpu_linear_add_(r.view(b * s, c), h, w4, chan.fc2.bias.to(dtype), packed4).view(b, s, c)
            norm = model.norm
            return K.layer_norm(r, None, None, norm.weight, norm.bias, EPS, torch.float32 if autocast else dtype)

    def _forward_graphed(self, x: torch.Tensor, dtype: torch.dtype, autocast: bool, features_only: bool) -> torch.Tensor:
        # A graph reads the parameters at the addresses it was captured with: parameters that were
        # replaced (a new head, .to(), .half()) need new graphs. In-place updates are seen as they are.
        where = tuple(p.data_ptr() for p in self.model.parameters())
        if where != self._graph_params:
            self._graphs.clear()
            self._graph_params = where
        key = (tuple(x.shape), x.dtype, x.device, dtype, autocast, features_only)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(x, dtype, autocast, features_only)
            except Exception as e:  # capture unsupported here: eager is correct, just slower
                warnings.warn(f"CUDA graph capture failed ({e}); running the fast path without graphs.",
                              FastPathWarning, stacklevel=_callers_stacklevel())
                self.cuda_graphs = False
                return self._infer(x, dtype, autocast, features_only)
            self._graphs[key] = entry
        graph, static_x, static_out = entry
        static_x.copy_(x)
        graph.replay()
        return static_out.clone()

    def _infer(self, x: torch.Tensor, dtype: torch.dtype, autocast: bool, features_only: bool) -> torch.Tensor:
        return self._finish(self._features_infer(x, dtype, autocast), dtype, autocast, features_only)

    def _capture(self, x: torch.Tensor, dtype: torch.dtype, autocast: bool, features_only: bool) -> tuple:
        static_x = x.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up: Triton compiles and autotunes outside the capture
            for _ in range(2):
                self._infer(static_x, dtype, autocast, features_only)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._infer(static_x, dtype, autocast, features_only)
        return graph, static_x, static_out

    def reset_graphs(self) -> None:
        """Drop the captured CUDA graphs (and the memory they hold)."""
        self._graphs.clear()

    # -- training -------------------------------------------------------------------------------

    def _features_train(self, x: torch.Tensor, dtype: torch.dtype, autocast: bool) -> torch.Tensor:
        model = self.model
        dev = x.device.type
        with _autocast(dev, dtype, autocast):
            r = model.stem(x)
        # The model's gradient checkpointing (set_grad_checkpointing, --grad-checkpointing) as the plain path does
        # it: each block keeps only its input, and its branches run again in the backward.
        checkpointed = model.grad_checkpointing and torch.is_grad_enabled()
        with torch.autocast(dev, enabled=False):
            for blk in model.blocks:
                if checkpointed:
                    r = checkpoint(_block_train, r, blk, dtype, model.config.gelu, use_reentrant=False)
                else:
                    r = _block_train(r, blk, dtype, model.config.gelu)
        with _autocast(dev, dtype, autocast):
            return model.norm(r).transpose(0, 1)


def _block_train(r: torch.Tensor, blk: nn.Module, dtype: torch.dtype, act: str) -> torch.Tensor:
    """One Mixer block in training on the (S, B, C) stream, its products in `dtype`."""
    tok, chan = blk.mlp_tokens, blk.mlp_channels
    r = _TokenBranch.apply(
        r, blk.norm1.weight.to(dtype), blk.norm1.bias.to(dtype), tok.fc1.weight.to(dtype),
        tok.fc1.bias.to(dtype), tok.fc2.weight.to(dtype), tok.fc2.bias.to(dtype), act,
    )
    return _ChannelBranch.apply(
        r, blk.norm2.weight.to(dtype), blk.norm2.bias.to(dtype), chan.fc1.weight.to(dtype),
        chan.fc1.bias.to(dtype), chan.fc2.weight.to(dtype), chan.fc2.bias.to(dtype), act,
    )


def optimize(model: MlpMixer, cuda_graphs: bool = True, gemm: str = "auto") -> FastMixer:
    """Wrap `model` in the fast path; parameters are shared, so training either trains both. Not to be
    compiled: under `torch.compile` the wrapper runs the plain path (see `FastMixer`)."""
    return FastMixer(model, cuda_graphs=cuda_graphs, gemm=gemm)
