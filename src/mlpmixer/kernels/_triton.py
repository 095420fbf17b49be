"""Triton kernels behind `mlpmixer.kernels` (imported only when a kernel is about to run).

Every kernel computes in fp32 and rounds once when it stores, like the PyTorch ops it replaces.
`TRITON_INTERPRET=1` must be set before this module is first imported for the CPU interpreter.
No `from __future__ import annotations` here: Triton 3.0's interpreter recognises `tl.constexpr`
parameters only by the annotation object, not by its string.
"""


import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from . import interpreting, next_power_of_2

# The GELUs' constants are written into the kernels as numbers: the GPU compiler refuses plain
# Python globals in a kernel, and the CPU interpreter mishandles tl.constexpr ones.


@triton.jit
def _tanh(u):
    # tanh through the sigmoid: one exp, and exact enough in fp32 (tl.math's tanh varies by version).
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def _gelu(x, ACT: tl.constexpr):
    if ACT == 1:  # exact (erf) GELU; 0.7071... = 1/√2
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 2:  # tanh approximation; 0.7978... = √(2/π)
        x = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    return x


_ACT = {"none": 0, "exact": 1, "tanh": 2}

# ---------------------------------------------------------------------------------------------


@triton.jit
def _layer_norm_kernel(
    R, ROW_BIAS, COL_BIAS, W, BIAS, Y, C, B, eps,
    HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row = token · B + image of the (S, B, C) stream
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(R + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_ROW:
        x += tl.load(ROW_BIAS + row // B)
    if HAS_COL:
        x += tl.load(COL_BIAS + cols, mask=mask, other=0.0)
    x = tl.where(mask, x, 0.0)  # the padding columns must not count (the row bias reached them)
    mean = tl.sum(x, axis=0) / C
    d = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * C + cols, (d * rstd * w + b).to(Y.dtype.element_ty), mask=mask)


def layer_norm(
    r: torch.Tensor,
    row_bias: Optional[torch.Tensor],
    col_bias: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    s, b, c = r.shape
    y = torch.empty(r.shape, dtype=out_dtype, device=r.device)
    block = next_power_of_2(c)
    _layer_norm_kernel[(s * b,)](
        r,
        row_bias.float().contiguous() if row_bias is not None else r,
        col_bias.float().contiguous() if col_bias is not None else r,
        weight.contiguous(), bias.contiguous(), y, c, b, eps,
        HAS_ROW=row_bias is not None, HAS_COL=col_bias is not None, BLOCK_C=block,
        num_warps=min(max(block // 256, 1), 8),
    )
    return y


# LayerNorm in training: a block of BLOCK_R rows at a time, not one row per program, for the narrow
# rows of small Mixers (C = 128 for Mixer-nano: PyTorch's kernels spent 38 µs on the forward and 95 µs
# on the weight and bias gradients of a 32,768 × 128 bf16 stream on an H200, where a pass over it
# takes a few µs).


@triton.jit
def _layer_norm_train_kernel(
    X, W, BIAS, Y, MEAN, RSTD, rows, C, eps,
    STATS_GIVEN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = r < rows
    mask = rmask[:, None] & (cols < C)[None, :]
    offs = r[:, None] * C + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if STATS_GIVEN:  # recomputing the output in the backward: the forward's statistics are saved
        mean = tl.load(MEAN + r, mask=rmask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r, mask=rmask, other=0.0).to(tl.float32)
    else:
        mean = tl.sum(x, axis=1) / C
        d = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
        tl.store(MEAN + r, mean.to(MEAN.dtype.element_ty), mask=rmask)
        tl.store(RSTD + r, rstd.to(RSTD.dtype.element_ty), mask=rmask)
    w = tl.load(W + cols, mask=cols < C, other=0.0).to(tl.float32)
    b = tl.load(BIAS + cols, mask=cols < C, other=0.0).to(tl.float32)
    y = (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_backward_kernel(
    DY, X, MEAN, RSTD, W, RES, DX, DW_PART, DB_PART, rows, C, rows_per_program,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Each program takes rows_per_program rows (a multiple of BLOCK_R) and writes its share of the
    # weight and bias gradients; the caller sums the shares.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    db = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for step in range(0, rows_per_program // BLOCK_R):
        r = first + step * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = r < rows
        mask = rmask[:, None] & cmask[None, :]
        offs = r[:, None] * C + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + r, mask=rmask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r, mask=rmask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / C
        c2 = tl.sum(wdy, axis=1) / C
        dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        dx += tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)  # the residual's own gradient
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    tl.store(DW_PART + pid * C + cols, tl.sum(dw, axis=0), mask=cmask)
    tl.store(DB_PART + pid * C + cols, tl.sum(db, axis=0), mask=cmask)


def _row_block(c: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): rows of a power-of-two width, about 2,048 elements a block."""
    block_c = next_power_of_2(c)
    return max(1, 2048 // block_c), block_c


# The LayerNorm kernels' blocks of 2,048 elements run on 8 warps: 8 elements a thread per tensor. With
# 4,096 and 4 warps the backward needed 255 registers a thread and spilled 204 bytes (ptxas for sm_90,
# 128 channels); now 94 to 128 registers for 128 to 2,048 channels, none spilled (2026-11-28).
LN_WARPS = 8


def layer_norm_train(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    mean: Optional[torch.Tensor], rstd: Optional[torch.Tensor], stats_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = x.shape[-1]
    rows = x.numel() // c
    given = mean is not None
    if not given:
        mean = torch.empty((*x.shape[:-1], 1), dtype=stats_dtype, device=x.device)
        rstd = torch.empty_like(mean)
    y = torch.empty_like(x)
    block_r, block_c = _row_block(c)
    _layer_norm_train_kernel[(triton.cdiv(rows, block_r),)](
        x, weight.contiguous(), bias.contiguous(), y, mean, rstd, rows, c, eps,
        STATS_GIVEN=given, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=LN_WARPS,
    )
    return y, mean, rstd


@functools.lru_cache(maxsize=None)
def _programs(device: torch.device) -> int:
    """Programs for a grid-wide reduction: a few per multiprocessor (a handful in the interpreter)."""
    if device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _split_rows(rows: int, block_r: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows each takes, a multiple of block_r) for a reduction over `rows` rows."""
    programs = min(_programs(device), triton.cdiv(rows, block_r))
    per_program = triton.cdiv(triton.cdiv(rows, programs), block_r) * block_r
    return triton.cdiv(rows, per_program), per_program


def layer_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
    residual: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = x.shape[-1]
    rows = x.numel() // c
    block_r, block_c = _row_block(c)
    programs, per_program = _split_rows(rows, block_r, x.device)
    dx = torch.empty_like(x)
    parts = torch.empty((2, programs, c), dtype=torch.float32, device=x.device)
    _layer_norm_backward_kernel[(programs,)](
        dy, x, mean, rstd, weight.contiguous(), residual, dx, parts[0], parts[1], rows, c, per_program,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=LN_WARPS,
    )
    dw, db = parts.sum(1).to(weight.dtype)
    return dx, dw, db


@triton.jit
def _column_sums_kernel(
    T, PART, rows, C, rows_per_program, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # As the LayerNorm backward's weight gradient: shares of the sums per program, summed by the caller.
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for step in range(0, rows_per_program // BLOCK_R):
        r = first + step * BLOCK_R + tl.arange(0, BLOCK_R)
        acc += tl.load(T + r[:, None] * C + cols[None, :], mask=(r < rows)[:, None] & cmask[None, :],
                       other=0.0).to(tl.float32)
    tl.store(PART + pid * C + cols, tl.sum(acc, axis=0), mask=cmask)


def column_sums(t: torch.Tensor) -> torch.Tensor:
    rows, c = t.shape
    block_r, block_c = _row_block(min(c, 256))  # wider matrices: several programs across the columns
    programs, per_program = _split_rows(rows, block_r, t.device)
    parts = torch.empty((programs, c), dtype=torch.float32, device=t.device)
    _column_sums_kernel[(programs, triton.cdiv(c, block_c))](
        t, parts, rows, c, per_program, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return parts.sum(0).to(t.dtype)


# ---------------------------------------------------------------------------------------------


@triton.jit
def _linear_act_kernel(
    A, Bm, BIAS, Cm, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BIAS_ON_ROWS: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles share the B tiles they read while those sit in L2.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * grid_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    b_ptrs = Bm + rk[:, None] * stride_bk + rn[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        kk = k * BLOCK_K + rk
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptrs, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if IEEE:  # fp32 inputs: full fp32 products, as torch does by default (no TF32)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if BIAS_ON_ROWS:
        acc += tl.load(BIAS + rm, mask=rm < M, other=0.0).to(tl.float32)[:, None]
    else:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    acc = _gelu(acc, ACT)
    c_ptrs = Cm + rm[:, None].to(tl.int64) * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(Cm.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _gpu_configs() -> list:
    # A few tile shapes that suit Hopper and Ampere bf16 GEMMs of the Mixer's sizes; autotuned
    # per (M, N, K) on first use.
    cfg = triton.Config
    return [
        cfg({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
        cfg({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    ]


@functools.lru_cache(maxsize=None)
def _linear_act_tuned():  # made on first GPU use: from Triton 3.2, autotune wants a GPU driver when made
    return triton.autotune(configs=_gpu_configs(), key=["M", "N", "K"])(_linear_act_kernel)


def linear_act(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor, bias_on_rows: bool, act: str) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[1]
    out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    args = (a, b, bias, out, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1))
    flags = dict(BIAS_ON_ROWS=bias_on_rows, ACT=_ACT[act], IEEE=a.dtype == torch.float32)
    if interpreting() or a.device.type != "cuda":
        # Small fixed tiles: the interpreter runs every program in Python.
        grid = (triton.cdiv(m, 16) * triton.cdiv(n, 16),)
        _linear_act_kernel[grid](*args, **flags, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=4)
    else:
        def grid(meta: dict) -> tuple:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _linear_act_tuned()[grid](*args, **flags)
    return out


# ---------------------------------------------------------------------------------------------


@triton.jit
def _gelu_fwd_bwd_kernel(PRE, GRAD, H, DPRE, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(PRE + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GRAD + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == 1:  # 0.7071... = 1/√2, 0.3989... = 1/√(2π)
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        h = x * cdf
        dh = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    else:  # 0.7978... = √(2/π)
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = _tanh(inner)
        h = 0.5 * x * (1.0 + t)
        dh = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)
    tl.store(DPRE + offs, (g * dh).to(DPRE.dtype.element_ty), mask=mask)


def gelu_fwd_bwd(pre: torch.Tensor, grad: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    h = torch.empty_like(pre)
    dpre = torch.empty_like(grad)
    n = pre.numel()
    block = 1024
    _gelu_fwd_bwd_kernel[(triton.cdiv(n, block),)](pre, grad, h, dpre, n, ACT=_ACT[act], BLOCK=block, num_warps=4)
    return h, dpre
