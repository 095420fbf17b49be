"""Shared fixtures: keep this small; helpers belong next to the tests that use them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlpmixer import MixerConfig


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or fills the user's real download cache (~/.cache/mlpmixer)."""
    monkeypatch.setenv("MLPMIXER_CACHE", str(tmp_path_factory.mktemp("mlpmixer-cache")))
    monkeypatch.delenv("MLPMIXER_OFFLINE", raising=False)


@pytest.fixture
def tiny_config() -> MixerConfig:
    """A Mixer small enough for any test: 2 blocks, C=32, a rectangular 3×4 grid of 8×8 patches."""
    return MixerConfig(
        patch_size=8, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16, channels_mlp_dim=64,
        img_size=(24, 32), num_classes=5,
    )


@pytest.fixture
def child_env(tmp_path: Path) -> dict[str, str]:
    """The environment of the processes a test starts (mixer, torchrun): this checkout's mlpmixer, and their
    temporary files under the test's tmp_path, not /tmp, which would keep them: torchrun leaves a
    torchelastic_* folder behind at every run, and multiprocessing a pymp-* one for a process killed."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "TMPDIR": str(tmp)}
