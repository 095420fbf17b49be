"""Parity (issue 2, item 4): official-layout weights give the official model's logits, and timm
state dicts give timm's logits, each with relative error ≤ 1e-5 in float32.

Relative error here is max|ours − reference| / max|reference| over all logits of the batch
(`numpy_reference.rel_err`). The official model is stood in for by tests/numpy_reference.py, an
independent float64 NumPy implementation of SPEC §1 reading the official key layout of SPEC §6.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import numpy_reference as ref
from mlpmixer import MixerConfig, create_model, load_checkpoint

TOLERANCE = 1e-5


def official_npz(path: Path, seed: int, **shape) -> dict[str, np.ndarray]:
    params = ref.random_params(np.random.default_rng(seed), **shape)
    np.savez(path, **params)
    return params


def nhwc_images(seed: int, batch: int, height: int, width: int, chans: int = 3) -> np.ndarray:
    """Inputs as the official model takes them: NHWC, pixel values in [-1, 1]."""
    return np.random.default_rng(seed).uniform(-1, 1, (batch, height, width, chans)).astype(np.float32)


def our_logits(model: torch.nn.Module, nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(nhwc).permute(0, 3, 1, 2)).double().numpy()


def test_reference_matches_our_model_in_float64(tmp_path: Path) -> None:
    """In float64 the two implementations agree to rounding: the layouts and formulas are the same."""
    params = official_npz(tmp_path / "small.npz", 0, patch=(4, 4), hidden=24, blocks=3, tokens=12,
                          tokens_mlp=10, channels_mlp=40)
    model = load_checkpoint(tmp_path / "small.npz", img_size=(12, 16)).double()
    x = nhwc_images(1, 3, 12, 16).astype(np.float64)
    with torch.no_grad():
        ours = model.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert ref.rel_err(ours, ref.forward(params, x)) < 1e-12


@pytest.mark.parametrize("variant", ["S/32", "S/16"])
def test_official_npz_parity_full_size(tmp_path: Path, variant: str) -> None:
    patch, tokens = {"S/32": (32, 49), "S/16": (16, 196)}[variant]
    params = official_npz(tmp_path / "mixer.npz", 2, patch=(patch, patch), hidden=512, blocks=8,
                          tokens=tokens, tokens_mlp=256, channels_mlp=2048, num_classes=1000)
    model = load_checkpoint(tmp_path / "mixer.npz")
    assert model.config.describe() == f"Mixer-{variant}" and model.config.gelu == "tanh"
    assert model.config.num_params() == sum(v.size for v in params.values())
    x = nhwc_images(3, 2, 224, 224)
    expected = ref.forward(params, x)
    err = ref.rel_err(our_logits(model, x), expected)
    assert err <= TOLERANCE, f"relative error {err:.2e}"
    # The test can tell GELUs apart: timm's exact GELU on official weights is off by far more.
    exact = load_checkpoint(tmp_path / "mixer.npz", gelu="exact")
    assert ref.rel_err(our_logits(exact, x), expected) > 10 * TOLERANCE


def test_official_npz_parity_rectangular_and_headless(tmp_path: Path) -> None:
    shape = dict(patch=(8, 8), hidden=64, blocks=4, tokens=12, tokens_mlp=32, channels_mlp=256)
    params = official_npz(tmp_path / "head.npz", 4, **shape, num_classes=17)
    x = nhwc_images(5, 4, 24, 32)
    model = load_checkpoint(tmp_path / "head.npz", img_size=(24, 32))
    assert ref.rel_err(our_logits(model, x), ref.forward(params, x)) <= TOLERANCE

    headless = official_npz(tmp_path / "headless.npz", 6, **shape, num_classes=0)
    model = load_checkpoint(tmp_path / "headless.npz", img_size=(24, 32))
    assert model.num_classes == 0
    features = our_logits(model, x)
    assert features.shape == (4, 64)
    assert ref.rel_err(features, ref.forward(headless, x)) <= TOLERANCE


# --- timm ------------------------------------------------------------------------------------

timm = pytest.importorskip("timm")


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random and non-zero (timm zero-initialises the head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                center = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(center + 0.1 * torch.randn(p.shape, generator=g))


def timm_files(model: torch.nn.Module, folder: Path) -> list[Path]:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    files = [folder / "timm.pth", folder / "pytorch_model.bin", folder / "model.safetensors"]
    torch.save(state, files[0])
    torch.save(state, files[1])
    save_file(state, files[2])  # as timm's hub files: no metadata
    return files


def test_timm_parity_s16(tmp_path: Path) -> None:
    reference = timm.create_model("mixer_s16_224", num_classes=1000).eval()
    randomise(reference, 7)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with torch.no_grad():
        expected = reference(x).double().numpy()
    for path in timm_files(reference, tmp_path):
        model = load_checkpoint(path).eval()
        assert model.config.describe() == "Mixer-S/16" and model.config.gelu == "exact", path.name
        with torch.no_grad():
            err = ref.rel_err(model(x).double().numpy(), expected)
        assert err <= TOLERANCE, f"{path.name}: relative error {err:.2e}"
    # And the GELU matters: the official tanh form on timm's weights misses by far more.
    with torch.no_grad():
        tanh = load_checkpoint(path, gelu="tanh").eval()(x).double().numpy()
    assert ref.rel_err(tanh, expected) > 10 * TOLERANCE


def test_timm_parity_rectangular_greyscale(tmp_path: Path) -> None:
    from timm.models.mlp_mixer import MlpMixer as TimmMixer

    reference = TimmMixer(num_classes=7, img_size=(32, 48), in_chans=1, patch_size=8, num_blocks=3,
                          embed_dim=48, mlp_ratio=(0.5, 4.0)).eval()
    randomise(reference, 9)
    x = torch.randn(3, 1, 32, 48, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        expected = reference(x).double().numpy()
    path = timm_files(reference, tmp_path)[0]
    # A 4×6 grid is not square: the size comes from the caller, or from the model loaded into.
    built = load_checkpoint(path, img_size=(32, 48))
    given = create_model(MixerConfig(patch_size=8, hidden_dim=48, num_blocks=3, tokens_mlp_dim=24,
                                     channels_mlp_dim=192, img_size=(32, 48), in_chans=1, num_classes=7,
                                     gelu="exact"))
    load_checkpoint(path, model=given)
    for model in (built, given):
        with torch.no_grad():
            assert ref.rel_err(model.eval()(x).double().numpy(), expected) <= TOLERANCE
