"""Shared fixtures: keep this small; helpers belong next to the tests that use them."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from mlpmixer import MixerConfig


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or fills the user's real download cache (~/.cache/mlpmixer)."""
    monkeypatch.setenv("MLPMIXER_CACHE", str(tmp_path_factory.mktemp("mlpmixer-cache")))
    monkeypatch.delenv("MLPMIXER_OFFLINE", raising=False)


@pytest.fixture(autouse=True, scope="session")
def _temporary_files_in_pytests_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Temporary files of the test process and of what it forks go under pytest's folder (pruned by pytest),
    not /tmp: DataLoader workers exit without cleaning up, and each left a pymp-* folder there."""
    folder = str(tmp_path_factory.mktemp("tmp"))
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = folder, folder
    yield
    if saved[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[0]
    tempfile.tempdir = saved[1]


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
