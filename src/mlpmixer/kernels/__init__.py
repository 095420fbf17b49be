"""The fast path's fused operations, each with a plain-PyTorch twin that defines its numerics.

These operations are fused, with Triton on CUDA (and on the CPU under `TRITON_INTERPRET=1`, which
the tests use):

- `layer_norm`: LayerNorm of a residual stream whose biases are still *pending*. The fast path
  adds each block's residual branch with an in-place GEMM (`r.addmm_(W, h)`, the residual add done
  by the GEMM's β=1 epilogue) and leaves the branch's output bias out; the biases are summed into
  a per-token and a per-channel vector and added here, in fp32 (float64 for float64), while the
  LayerNorm reads the stream anyway. So the residual adds and the output biases cost no memory pass
  of their own.
- `linear_act`: a matrix product with the bias and the GELU in its epilogue.
- on the CPU with AVX-512, `cpu_linear_act` and `cpu_linear_add_`: the channel MLP's products through
  oneDNN, in inference with the GELU and the residual add in their epilogues.
- in training, `layer_norm_train` and `layer_norm_backward`: LayerNorm and its backward on blocks of
  rows, the backward adding the residual's gradient to dx; `gelu_fwd_bwd`, the GELU recomputed
  and differentiated in one pass (on the CPU the forward keeps the GELU's output: `gelu_stored`);
  `column_sums`, the channel MLP's bias gradients.

Any failure of a Triton kernel (import, compilation, launch) or a mismatch with the plain twin
on its first use for a shape turns Triton off for the process with one warning; the plain
twin then runs, so a broken kernel costs speed, never correctness. cuBLASLt's GELU epilogue
(`torch._addmm_activation`) and oneDNN's products are checked and switched off the same way.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

ACTIVATIONS = ("none", "exact", "tanh")  # "exact"/"tanh": the two GELUs of MixerConfig.gelu

_state = {"disabled_reason": None, "cublaslt_off": None, "onednn_off": None}
_verified: set = set()


def interpreting() -> bool:
    """True when Triton runs its kernels in the CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def disable_triton(reason: str) -> None:
    """Turn the Triton kernels off for this process, warning once."""
    if _state["disabled_reason"] is None:
        _state["disabled_reason"] = reason
        warnings.warn(f"Triton kernels disabled, using the plain PyTorch path instead: {reason}", stacklevel=3)


def disable_cublaslt(reason: str) -> None:
    """Stop using cuBLASLt's GELU epilogue for this process, warning once."""
    if _state["cublaslt_off"] is None:
        _state["cublaslt_off"] = reason
        warnings.warn(f"cuBLASLt GELU epilogue disabled, using GEMM then GELU instead: {reason}", stacklevel=3)


def disable_onednn(reason: str) -> None:
    """Stop using oneDNN's linear for the CPU's channel mixing in this process, warning once."""
    if _state["onednn_off"] is None:
        _state["onednn_off"] = reason
        warnings.warn(f"oneDNN linear disabled, using PyTorch's addmm instead: {reason}", stacklevel=3)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and statistics of `dtype` tensors run in: fp32 for bf16, fp16 and fp32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def triton_usable(t: torch.Tensor) -> bool:
    """Whether the Triton kernels may run on `t` in this process (they compute in fp32: a float64 tensor
    keeps PyTorch's float64 operations)."""
    if _state["disabled_reason"] is not None or t.dtype == torch.float64:
        return False
    if t.device.type != "cuda" and not interpreting():
        return False
    try:
        from . import _triton  # noqa: F401  (imports triton lazily: it is optional)
    except Exception as e:  # ImportError, or a broken Triton install
        disable_triton(f"cannot import Triton ({e})")
        return False
    problem = _interpreter_problem() if interpreting() else None
    if problem:
        disable_triton(problem)
        return False
    return True


# Triton's CPU interpreter computes through NumPy, and some pairs of versions compute wrong results or fail:
# (Triton release that fixed it, first NumPy release that shows it, what goes wrong). Seen here with the
# kernels of this package, 2026-11: Triton 3.0.0 and 3.1.0 lose every store under NumPy 2.0.2 (the outputs
# keep their old contents); Triton 3.2.0 to 3.6.0 fail on a loop with a run-time bound under NumPy 2.4.6
# (a 1-element array turned into an int, which NumPy 2.4 refuses); 3.7.0 and 3.8.0 work.
_INTERPRETER_BUGS = [((3, 2), (2, 0), "loses its stores"), ((3, 7), (2, 4), "fails on loops")]


def _interpreter_problem() -> Optional[str]:
    """Why Triton's CPU interpreter would compute wrong results or fail here, or None."""
    import numpy
    import triton

    def major_minor(version: str) -> tuple[int, int]:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)

    for fixed_in, numpy_from, what in _INTERPRETER_BUGS:
        if major_minor(triton.__version__) < fixed_in and major_minor(numpy.__version__) >= numpy_from:
            return (f"the CPU interpreter of Triton {triton.__version__} {what} under NumPy {numpy.__version__}; "
                    f"install numpy<{'.'.join(map(str, numpy_from))} or Triton >= {'.'.join(map(str, fixed_in))}")
    return None


def _close(out, ref) -> bool:
    """Relative error of each whole tensor, within the tolerance of its dtype."""
    if isinstance(out, tuple):
        return all(_close(o, r) for o, r in zip(out, ref))
    tol = 1e-2 if out.dtype in (torch.bfloat16, torch.float16) else 1e-4
    out, ref = out.float(), ref.float()
    err = (out - ref).norm() / ref.norm().clamp_min(1e-12)
    return bool(torch.isfinite(out).all()) and err.item() <= tol


def _all_zero(ref) -> bool:
    """Whether any tensor of the result is all zeros (and so says little about a kernel that matched it)."""
    if isinstance(ref, tuple):
        return any(_all_zero(r) for r in ref)
    return not bool(ref.any())


def _run_checked(name: str, key: tuple, fused_fn, ref_fn, disable=disable_triton, zeros_prove: bool = True):
    """Run a fused kernel; on its first use for `key`, also check it against the plain twin.

    `zeros_prove=False` (the backward kernels): a check whose plain result has an all-zero tensor does not
    count, and the next use checks again. A fresh model's head is zero, so its first training step sends
    exact zeros through every backward; a kernel that matched only those would be trusted unchecked.
    """
    try:
        out = fused_fn()
    except Exception as e:  # compilation or launch failure: never crash, never guess
        disable(f"{name} failed ({type(e).__name__}: {e})")
        return ref_fn()
    if key not in _verified:
        ref = ref_fn()
        if not _close(out, ref):
            disable(f"{name} disagreed with the plain PyTorch result for shape {key}")
            return ref
        if zeros_prove or not _all_zero(ref):
            _verified.add(key)
    return out


# ---------------------------------------------------------------------------------------------
# LayerNorm over channels of a (S, B, C) stream with pending per-token and per-channel biases.


def layer_norm_ref(
    r: torch.Tensor,
    row_bias: Optional[torch.Tensor],
    col_bias: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """LayerNorm(r + row_bias[s] + col_bias[c]) in fp32 (float64 for a float64 stream), returned in `out_dtype`."""
    acc = accumulation_dtype(r.dtype)
    if r.device.type == "cpu" and r.dtype == torch.bfloat16 and row_bias is None and col_bias is None:
        # PyTorch's CPU LayerNorm reads bf16 with fp32 weights and computes in fp32 itself: no fp32 copy of the stream.
        return F.layer_norm(r, r.shape[-1:], weight.to(acc), bias.to(acc), eps).to(out_dtype)
    x = r.to(acc)
    # The two bias vectors make one small (S, 1, C) table first: one pass over the stream, not two.
    if row_bias is not None and col_bias is not None:
        x = x + (row_bias.to(acc)[:, None] + col_bias.to(acc))[:, None, :]
    elif row_bias is not None:
        x = x + row_bias.to(acc)[:, None, None]
    elif col_bias is not None:
        x = x + col_bias.to(acc)
    return F.layer_norm(x, x.shape[-1:], weight.to(acc), bias.to(acc), eps).to(out_dtype)


def layer_norm(
    r: torch.Tensor,
    row_bias: Optional[torch.Tensor],
    col_bias: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """LayerNorm over the last axis of the stream `r` plus the pending biases, in one memory pass on CUDA.

    With a `row_bias` (per token), `r` is the tokens-first (S, B, C) stream; without, any layout.
    """
    out_dtype = out_dtype or r.dtype

    def ref() -> torch.Tensor:
        return layer_norm_ref(r, row_bias, col_bias, weight, bias, eps, out_dtype)

    if not (r.is_contiguous() and triton_usable(r)):
        return ref()
    from . import _triton

    key = ("layer_norm", tuple(r.shape), r.dtype, out_dtype)
    return _run_checked(
        "the Triton LayerNorm", key,
        lambda: _triton.layer_norm(r, row_bias, col_bias, weight, bias, eps, out_dtype), ref,
    )


# LayerNorm over the last axis in training: the forward with its statistics, the output again from
# saved statistics (the backward recomputes it rather than storing it), and the backward with the
# residual's gradient added to dx.


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    # PyTorch's own LayerNorm keeps fp32 statistics on CUDA and the input's dtype on the CPU; its
    # backward, the plain twin below, insists on the same.
    return x.dtype if x.device.type == "cpu" else accumulation_dtype(x.dtype)


def layer_norm_train(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    mean: Optional[torch.Tensor] = None, rstd: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(LayerNorm(x), mean, rstd) as `torch.native_layer_norm`; given `mean` and `rstd`, only the output."""
    c = x.shape[-1]

    def ref() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, m, r = torch.native_layer_norm(x, (c,), weight, bias, eps)
        return (y, m, r) if mean is None else (y, mean, rstd)

    if not (x.is_contiguous() and triton_usable(x)):
        return ref()
    from . import _triton

    key = ("layer_norm_train", tuple(x.shape), x.dtype, mean is None)
    return _run_checked(
        "the Triton LayerNorm", key,
        lambda: _triton.layer_norm_train(x, weight, bias, eps, mean, rstd, _stats_dtype(x)), ref,
    )


def layer_norm_backward_ref(
    dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor, residual: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(
        dy, x, x.shape[-1:], mean, rstd, weight, bias, [True] * 3
    )
    return dx.add_(residual), dw, db


def layer_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor, residual: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx + residual, dweight, dbias) of LayerNorm(x) for the output's gradient `dy`, in one pass on CUDA."""
    def ref() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return layer_norm_backward_ref(dy, x, mean, rstd, weight, bias, residual)

    tensors = (dy, x, mean, rstd, residual)
    if not (all(t.is_contiguous() for t in tensors) and triton_usable(x)):
        return ref()
    from . import _triton

    key = ("layer_norm_backward", tuple(x.shape), x.dtype)
    return _run_checked(
        "the Triton LayerNorm backward", key,
        lambda: _triton.layer_norm_backward(dy, x, mean, rstd, weight, residual), ref, zeros_prove=False,
    )


def column_sums(t: torch.Tensor) -> torch.Tensor:
    """`t.sum(0)` of a (rows, C) matrix: PyTorch's reduction over the long axis of a tall one is slow
    on CUDA (about 40 µs for Mixer-nano's bias gradients, 32,768 × 128 and × 512, on an H200)."""
    if not (t.dim() == 2 and t.is_contiguous() and triton_usable(t)):
        return t.sum(0)
    from . import _triton

    key = ("column_sums", tuple(t.shape), t.dtype)
    return _run_checked("the Triton column sums", key, lambda: _triton.column_sums(t), lambda: t.sum(0),
                        zeros_prove=False)


# ---------------------------------------------------------------------------------------------
# act(a @ b + bias): the bias runs along the output's rows (token mixing, W1 · X) or columns.


# The tanh GELU on the CPU in fp32, as 0.5·x·(1 + tanh(u)) = x·σ(2u) with u = √(2/π)·(x + 0.044715·x³),
# in a few in-place passes: PyTorch's CPU kernel for it took 738 µs on a 1024×192 block against 441 µs
# for this (and about 245 µs for the exact GELU) on this project's AVX2 machine; the two agree to fp32
# rounding. Elsewhere PyTorch's kernels run.
_K1 = 2 * 0.7978845608028654  # 2·√(2/π)
_K3 = _K1 * 0.044715


def _tanh_by_sigmoid(x: torch.Tensor, act: str) -> bool:
    return act == "tanh" and x.device.type == "cpu" and x.dtype == torch.float32


def _sigmoid_of_2u(x: torch.Tensor) -> torch.Tensor:
    """σ(2u) of the tanh GELU, a new tensor."""
    return x.square().mul_(_K3).add_(_K1).mul_(x).sigmoid_()


def gelu_(h: torch.Tensor, act: str) -> torch.Tensor:
    """GELU in place (`act` "exact", "tanh" or "none"); returns `h`."""
    if _tanh_by_sigmoid(h, act):
        h.mul_(_sigmoid_of_2u(h))
    elif act != "none":
        torch.ops.aten.gelu_(h, approximate="none" if act == "exact" else "tanh")
    return h


def gelu(x: torch.Tensor, act: str) -> torch.Tensor:
    """GELU(x), a new tensor; `act` "exact" or "tanh"."""
    if _tanh_by_sigmoid(x, act):
        return x * _sigmoid_of_2u(x)
    return F.gelu(x, approximate="none" if act == "exact" else "tanh")


def linear_act_ref(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor, bias_on_rows: bool, act: str) -> torch.Tensor:
    """Plain PyTorch: one GEMM with the bias (cuBLAS/MKL), then the GELU in place."""
    h = torch.addmm(bias[:, None] if bias_on_rows else bias, a, b)
    return gelu_(h, act)


def linear_act(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor, bias_on_rows: bool, act: str, backend: str = "auto"
) -> torch.Tensor:
    """act(a @ b + bias), with `bias` per row (`bias_on_rows`) or per column of the result.

    backend: "triton" (Triton GEMM, bias and GELU in its epilogue), "cublaslt" (torch's
    `_addmm_activation`, whose CUDA epilogue is the tanh GELU, so only for act "tanh"/"none"),
    "torch" (GEMM then GELU), or "auto": Triton for bf16/fp16, else cuBLASLt where it computes the
    same function, else torch. The result may be a transposed view (cuBLASLt with a row bias); GEMMs
    take it as it is.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {act!r}; use one of {', '.join(ACTIVATIONS)}.")
    if backend == "auto":
        # Measured on an H100 (benchmarks/results/, bf16 inference): B/16 13.7k img/s with the Triton
        # GEMM against 10.2k with cuBLASLt's epilogue, L/16 4.2k against 3.0k; H/14 the other way,
        # 1.7k against 2.1k. Triton's fp32 products do not use the tensor cores that cuBLAS's do, so
        # fp32 stays with cuBLAS.
        half = a.dtype in (torch.bfloat16, torch.float16)
        backend = "triton" if half and triton_usable(a) else "cublaslt" if a.is_cuda and act != "exact" else "torch"

    def ref() -> torch.Tensor:
        return linear_act_ref(a, b, bias, bias_on_rows, act)

    if backend == "cublaslt" and a.is_cuda and act != "exact" and _state["cublaslt_off"] is None:

        def lt() -> torch.Tensor:
            # Lt puts the bias along the result's columns: a row bias means computing the transpose.
            if bias_on_rows:
                return torch._addmm_activation(bias, b.t(), a.t(), use_gelu=act == "tanh").t()
            return torch._addmm_activation(bias, a, b, use_gelu=act == "tanh")

        key = ("cublaslt", tuple(a.shape), tuple(b.shape), a.dtype, bias_on_rows, act)
        return _run_checked("the cuBLASLt GEMM", key, lt, ref, disable=disable_cublaslt)

    if backend != "triton" or not triton_usable(a):
        return ref()
    from . import _triton

    key = ("linear_act", tuple(a.shape), tuple(b.shape), a.dtype, bias_on_rows, act)
    return _run_checked(
        "the Triton GEMM", key, lambda: _triton.linear_act(a, b, bias, bias_on_rows, act), ref
    )


# ---------------------------------------------------------------------------------------------
# The channel MLP's products on the CPU through oneDNN; in inference the GELU and the residual add in their epilogues.


def onednn_usable(x: torch.Tensor) -> bool:
    """Whether CPU products of `x` go through oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, which
    inductor uses): in fp32 and bf16, on CPUs with AVX-512. There, on this project's 2-core AMD EPYC (2026-11-29,
    the channel-mixing shapes of S/16 and B/16 in fp32), its products ran 4-20% faster than MKL's, which
    PyTorch's addmm uses, and its GELU epilogue cost about what a separate GELU pass does. With oneDNN and MKL
    both held to AVX2 (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS) it was faster on one shape and slower on
    another, and on the AVX2 machine of 2026-11-27 its fused GELU was slower (docs/performance.md). Not under
    `TRITON_INTERPRET=1`, where the CPU stands in for a GPU."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and _state["onednn_off"] is None
            and not interpreting()
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))


def _gelu_attr(act: str) -> tuple[str, list, str]:
    """oneDNN linear's (post-op, scalars, algorithm) for `act`."""
    return ("none", [], "") if act == "none" else ("gelu", [], "none" if act == "exact" else "tanh")


def cpu_linear_act(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], act: str,
                   out: Optional[torch.Tensor] = None, packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """act(x @ wᵀ + b) for x (M, K), w (N, K) (a transposed view too; cast to x's dtype where it differs), `b`
    None for no bias: oneDNN, with the GELU in its epilogue and `packed` (`packed_weight`) for w where given,
    where `onednn_usable` (a new tensor); else PyTorch's product (into `out` if given), then the GELU in place."""

    def ref() -> torch.Tensor:
        wt = w.to(x.dtype).t()
        h = torch.mm(x, wt, out=out) if b is None else torch.addmm(b, x, wt, out=out)
        return gelu_(h, act)

    if not onednn_usable(x):
        return ref()
    key = ("onednn linear", tuple(x.shape), tuple(w.shape), x.dtype, act, b is None, packed is not None)
    weight = w.to(x.dtype) if packed is None else packed
    # A fresh model's first backward multiplies zeros: a check on those proves nothing.
    return _run_checked("oneDNN's linear", key, lambda: torch.ops.mkldnn._linear_pointwise(x, weight, b, *_gelu_attr(act)),
                        ref, disable=disable_onednn, zeros_prove=False)


def cpu_linear_add_(r: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                    packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """r + x @ wᵀ + b for r (M, N), x (M, K), w (N, K) (cast to x's dtype where it differs): oneDNN with the add
    in its epilogue and `packed` for w where given (a new tensor) where `onednn_usable`, else into `r` in place.
    Use the result: `r` itself may or may not hold it."""

    def ref() -> torch.Tensor:
        return r.addmm_(x, w.to(x.dtype).t()).add_(b)

    if not onednn_usable(x):
        return ref()
    key = ("onednn linear add", tuple(x.shape), tuple(w.shape), x.dtype, packed is not None)
    weight = w.to(x.dtype) if packed is None else packed
    # The fused result is made first: the check's plain twin then changes `r` after it has been read.
    return _run_checked("oneDNN's linear", key, lambda: torch.ops.mkldnn._linear_pointwise.binary(x, r, weight, b, "add"),
                        ref, disable=disable_onednn, zeros_prove=False)


# oneDNN's packed copies of weights for CPU inference: parameter -> ((storage, version, dtype), copy). By the
# parameter's identity, held weakly: a parameter freed frees its copy.
_packed = WeakIdKeyDictionary()


def packed_weight(w: torch.Tensor, dtype: torch.dtype, rows: int) -> Optional[torch.Tensor]:
    """`w` (a linear's weight, a parameter) in `dtype`, reordered into oneDNN's blocked layout for products of
    about `rows` rows (any number works), for `cpu_linear_act` and `cpu_linear_add_` in inference (it carries
    no gradient); None in fp32 or where this PyTorch cannot pack.

    Made on first use and kept while `w`'s storage and version counter stay the same: an optimiser step,
    `load_state_dict` and `.to()` make a new one, but an edit through `w.data`, which PyTorch does not count,
    is not seen (edit parameters in place under `torch.no_grad()` instead). In bf16 on this project's AVX-512
    EPYC (2026-11-29) the packed weights, with the casts they save, made inference 6% (S/16, batch 16) and
    7% (B/16, batch 8) faster; in fp32 packing gained about 2%, within the noise, so fp32 uses the parameters."""
    if dtype != torch.bfloat16 or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return None
    stamp = (w.data_ptr(), w._version, dtype)
    entry = _packed.get(w)
    if entry is None or entry[0] != stamp:
        entry = _packed[w] = stamp, torch.ops.mkldnn._reorder_linear_weight(w.detach().to(dtype), rows)
    return entry[1]


# ---------------------------------------------------------------------------------------------
# The GELU's backward, recomputing its output on the way where that is one fused pass (Triton).


def gelu_stored(pre: torch.Tensor) -> bool:
    """Whether a training branch keeps GELU(pre) for its backward instead of recomputing it there: where
    `gelu_fwd_bwd` is not one fused pass (no Triton: the CPU), the recomputation is a second GELU pass over
    the whole hidden activation: on this project's AVX-512 EPYC (2026-11-29) 6% of an S/16 training step
    with the tanh GELU, whose PyTorch CPU kernel is slow, and 1-2% with the exact one. Keeping it costs that
    activation's memory."""
    return not triton_usable(pre)


def gelu_fwd_bwd_ref(pre: torch.Tensor, grad: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    # PyTorch's backward stays: written with the sigmoid, the derivative took ten passes and was slower.
    return gelu(pre, act), gelu_backward(pre, grad, act)


def gelu_backward(pre: torch.Tensor, grad: torch.Tensor, act: str) -> torch.Tensor:
    """grad · GELU'(pre)."""
    return torch.ops.aten.gelu_backward(grad, pre, approximate="none" if act == "exact" else "tanh")


def gelu_fwd_bwd(pre: torch.Tensor, grad: torch.Tensor, act: str,
                 h: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(GELU(pre), grad · GELU'(pre)): GELU(pre) is `h` where the forward kept it (`gelu_stored`), else
    recomputed, in one pass over `pre` and `grad` on CUDA."""
    if h is not None:
        return h, gelu_backward(pre, grad, act)
    if not (pre.is_contiguous() and grad.is_contiguous() and triton_usable(pre)):
        return gelu_fwd_bwd_ref(pre, grad, act)
    from . import _triton

    key = ("gelu_fwd_bwd", tuple(pre.shape), pre.dtype, act)
    return _run_checked(
        "the Triton GELU backward", key,
        lambda: _triton.gelu_fwd_bwd(pre, grad, act), lambda: gelu_fwd_bwd_ref(pre, grad, act), zeros_prove=False,
    )


def next_power_of_2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))
