"""An independent NumPy (float64) MLP-Mixer, written from SPEC §1 and the official key layout of SPEC §6.

It shares no code with the package: it reads the official flat '/'-joined parameter names directly,
takes NHWC images like the official Flax model, and patchifies with a reshape instead of a convolution.
"""

from __future__ import annotations

import numpy as np


def layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased variance, as Flax's LayerNorm
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """Flax's nn.gelu default (approximate=True)."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def mlp(x: np.ndarray, p: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    """Dense_1(gelu(Dense_0(x))) over the last axis; kernels are (in, out)."""
    h = gelu_tanh(x @ p[f"{prefix}/Dense_0/kernel"] + p[f"{prefix}/Dense_0/bias"])
    return h @ p[f"{prefix}/Dense_1/kernel"] + p[f"{prefix}/Dense_1/bias"]


def forward(p: dict[str, np.ndarray], images_nhwc: np.ndarray) -> np.ndarray:
    """Logits (or pre-logits when the parameters have no head) for images (B, H, W, in)."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in p.items()}
    x = np.asarray(images_nhwc, dtype=np.float64)
    ph, pw, cin, c = p["stem/kernel"].shape
    b, h, w, _ = x.shape
    # Non-overlapping patches, row-major over the grid, each flattened as (dy, dx, channel) -- the
    # order in which the (P, P, in, C) stem kernel is laid out.
    patches = x.reshape(b, h // ph, ph, w // pw, pw, cin).transpose(0, 1, 3, 2, 4, 5)
    tokens = patches.reshape(b, (h // ph) * (w // pw), ph * pw * cin)
    x = tokens @ p["stem/kernel"].reshape(ph * pw * cin, c) + p["stem/bias"]  # (B, S, C)
    n = 0
    while f"MixerBlock_{n}/LayerNorm_0/scale" in p:
        blk = f"MixerBlock_{n}"
        y = layer_norm(x, p[f"{blk}/LayerNorm_0/scale"], p[f"{blk}/LayerNorm_0/bias"])
        y = mlp(y.swapaxes(1, 2), p, f"{blk}/token_mixing").swapaxes(1, 2)  # mixes over tokens
        x = x + y
        y = layer_norm(x, p[f"{blk}/LayerNorm_1/scale"], p[f"{blk}/LayerNorm_1/bias"])
        x = x + mlp(y, p, f"{blk}/channel_mixing")
        n += 1
    x = layer_norm(x, p["pre_head_layer_norm/scale"], p["pre_head_layer_norm/bias"]).mean(axis=1)
    if "head/kernel" in p:
        x = x @ p["head/kernel"] + p["head/bias"]
    return x


def random_params(
    rng: np.random.Generator,
    *,
    patch: tuple[int, int],
    hidden: int,
    blocks: int,
    tokens: int,
    tokens_mlp: int,
    channels_mlp: int,
    in_chans: int = 3,
    num_classes: int = 10,
) -> dict[str, np.ndarray]:
    """Random, non-zero float32 parameters in the official layout (head included unless 0 classes).

    Kernels have std 1/sqrt(fan_in), so activations keep a sensible scale through the blocks;
    LayerNorm scales are near 1 and every bias is non-zero, so each tensor matters to the output.
    """

    def kernel(fan_in: int, *shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    def vec(n: int, center: float = 0.0) -> np.ndarray:
        return (center + 0.1 * rng.standard_normal(n)).astype(np.float32)

    ph, pw = patch
    p = {"stem/kernel": kernel(ph * pw * in_chans, ph, pw, in_chans, hidden), "stem/bias": vec(hidden)}
    for i in range(blocks):
        blk = f"MixerBlock_{i}"
        for ln in ("LayerNorm_0", "LayerNorm_1"):
            p[f"{blk}/{ln}/scale"], p[f"{blk}/{ln}/bias"] = vec(hidden, 1.0), vec(hidden)
        for mlp_name, dim, inner in (("token_mixing", tokens, tokens_mlp), ("channel_mixing", hidden, channels_mlp)):
            p[f"{blk}/{mlp_name}/Dense_0/kernel"] = kernel(dim, dim, inner)
            p[f"{blk}/{mlp_name}/Dense_0/bias"] = vec(inner)
            p[f"{blk}/{mlp_name}/Dense_1/kernel"] = kernel(inner, inner, dim)
            p[f"{blk}/{mlp_name}/Dense_1/bias"] = vec(dim)
    p["pre_head_layer_norm/scale"], p["pre_head_layer_norm/bias"] = vec(hidden, 1.0), vec(hidden)
    if num_classes:
        p["head/kernel"], p["head/bias"] = kernel(hidden, hidden, num_classes), vec(num_classes)
    return p


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|: the error relative to the output's scale."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())
