"""The paper's higher-resolution conversion (SPEC §5) and the resampling option."""

from __future__ import annotations

import pytest
import torch

from mlpmixer import create_model, load_checkpoint, resize_to
from mlpmixer.cli import main
from mlpmixer.model import MlpMixer
from mlpmixer.resize import part_major_index


def random_mixer(img_size=(8, 12), gelu="tanh", seed=0) -> MlpMixer:
    """A tiny Mixer whose every parameter (LayerNorms and head included) is random and non-trivial."""
    torch.manual_seed(seed)
    model = create_model("digits/4", img_size=img_size, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8,
                         channels_mlp_dim=32, num_classes=5, gelu=gelu)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.5 * torch.randn_like(p) / p[0].numel() ** 0.5 if p.ndim > 1 else 0.3 * torch.randn_like(p))
    return model.eval()


def tiled(tiles: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """(kh·kw, C, H, W) tiles, row-major -> one (1, C, kh·H, kw·W) image."""
    rows = [torch.cat(list(tiles[r * kw:(r + 1) * kw]), dim=-1) for r in range(kh)]
    return torch.cat(rows, dim=-2)[None]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("old,new,gelu", [
    ((8, 8), 16, "tanh"),            # square, K = 2
    ((8, 12), (16, 36), "exact"),    # rectangular model, K_h×K_w = 2×3
    ((12, 8), (36, 8), "tanh"),      # 3×1
])
def test_tiled_image_gives_mean_of_tile_logits(old, new, gelu):
    small = random_mixer(old, gelu)
    big = resize_to(small, new)
    kh, kw = big.config.img_size[0] // old[0], big.config.img_size[1] // old[1]
    assert big.config.tokens_mlp_dim == kh * kw * small.config.tokens_mlp_dim
    assert big.config.num_tokens == kh * kw * small.config.num_tokens
    tiles = torch.randn(kh * kw, 3, *old)
    with torch.no_grad():
        expected = small(tiles).mean(dim=0, keepdim=True)
        got = big(tiled(tiles, kh, kw))
        # Stronger than the logits: each part's token features are the tile's own.
        feats = big.forward_features(tiled(tiles, kh, kw))[0]
        gh, gw = small.config.grid
        grid = feats.reshape(kh, gh, kw, gw, -1).permute(0, 2, 1, 3, 4).reshape(kh * kw, gh * gw, -1)
        small_feats = small.forward_features(tiles)
    assert expected.abs().max() > 0.1  # the head is not trivial
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(grid, small_feats) <= 1e-5


def test_original_model_unchanged_and_identity_factor():
    small = random_mixer((8, 8))
    before = {k: v.clone() for k, v in small.state_dict().items()}
    same = resize_to(small, 8)
    for k, v in small.state_dict().items():
        assert torch.equal(v, before[k])
        assert torch.equal(same.state_dict()[k], v)
    assert same is not small


@pytest.mark.parametrize("wrap", ["fast", "compile"])
def test_wrapped_model_resizes_as_the_model_inside(wrap):
    from mlpmixer.fast import optimize

    model = random_mixer((8, 8))
    wrapped = optimize(model) if wrap == "fast" else torch.compile(model)
    new = resize_to(wrapped, 16)
    assert type(new) is MlpMixer and new.config == resize_to(model, 16).config
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), resize_to(model, 16).state_dict().values()))


@pytest.mark.parametrize("method", ["blockdiag", "resample"])
def test_resized_model_keeps_its_pooling(method):
    small = random_mixer((8, 8))
    small.reset_classifier(5, global_pool="")  # the head sees every token: logits (B, S, classes)
    big = resize_to(small, 16, method=method)
    assert big.global_pool == ""
    assert big(torch.randn(2, 3, 16, 16)).shape == (2, 16, 5)


def test_part_major_index_is_permutation_grouping_parts():
    index = part_major_index((2, 3), (2, 2))  # enlarged grid 4×6
    assert sorted(index.tolist()) == list(range(24))
    # Token (row 2, col 4) lies in part (1, 1) = 3, at local (0, 1) = 1.
    assert index[2 * 6 + 4].item() == 3 * 6 + 1


@pytest.mark.parametrize("size,match", [(20, "integer multiple"), ((16, 12), "integer multiple"),
                                        (18, "multiple of .*patch"), (4, "integer multiple")])
def test_bad_sizes_are_clear_errors(size, match):
    with pytest.raises(ValueError, match=match):
        resize_to(random_mixer((8, 8)), size)


def test_wrong_token_weights_are_a_clear_error():
    model = random_mixer((8, 8))
    model.blocks[1].mlp_tokens.fc1.weight = torch.nn.Parameter(torch.zeros(8, 9))
    with pytest.raises(ValueError, match="Block 1's token-mixing weights"):
        resize_to(model, 16)


def test_resample_nearest_is_exact_on_replicated_tokens():
    """Nearest resampling by an integer factor, on tokens repeated over K×K, gives each token its parent's
    output: the W1 scaling and the W2 layout are right."""
    small = random_mixer((8, 12))
    big = resize_to(small, (16, 24), method="resample", mode="nearest")
    assert big.config.tokens_mlp_dim == small.config.tokens_mlp_dim
    gh, gw = small.config.grid
    x = torch.randn(gh, gw, 2, 16)  # (token rows, token cols, batch, channels)
    up = x.repeat_interleave(2, 0).repeat_interleave(2, 1)
    with torch.no_grad():
        want = small.blocks[0].mlp_tokens(x.reshape(gh * gw, 2, 16)).reshape(gh, gw, 2, 16)
        got = big.blocks[0].mlp_tokens(up.reshape(4 * gh * gw, 2, 16)).reshape(2 * gh, 2 * gw, 2, 16)
    assert rel_err(got, want.repeat_interleave(2, 0).repeat_interleave(2, 1)) <= 1e-5


def test_resample_to_any_size_and_to_same_size():
    small = random_mixer((8, 8))
    odd = resize_to(small, (12, 20), method="resample")
    assert odd.config.img_size == (12, 20) and odd.config.num_tokens == 15
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.isfinite(odd(torch.randn(2, 3, 12, 20))).all()
        assert rel_err(resize_to(small, 8, method="resample")(x), small(x)) <= 1e-5
    with pytest.raises(ValueError, match="method"):
        resize_to(small, 16, method="cubic")


def test_cli_resize_roundtrip(tmp_path, capsys):
    small = random_mixer((8, 12))
    small.class_names = [f"c{i}" for i in range(5)]
    from mlpmixer import save_checkpoint

    save_checkpoint(small, tmp_path / "small.safetensors")
    out = tmp_path / "big.safetensors"
    assert main(["resize", str(tmp_path / "small.safetensors"), "--img-size", "16", "36", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "16×36" in said and "unchanged" not in said
    # To its own size: a copy, which said "token MLP 24 -> 24 wide" as if converted.
    assert main(["resize", str(tmp_path / "small.safetensors"), "--img-size", "8", "12", "--out",
                 str(tmp_path / "same.safetensors")]) == 0
    assert "(the checkpoint's own size: the weights are unchanged)." in capsys.readouterr().out
    big = load_checkpoint(out)
    assert big.config.img_size == (16, 36) and big.class_names == small.class_names
    for key, value in resize_to(small, (16, 36)).state_dict().items():
        assert torch.equal(big.state_dict()[key], value)
    assert main(["resize", str(tmp_path / "small.safetensors"), "--img-size", "18", "--out", str(out)]) == 2
    assert "not a multiple" in capsys.readouterr().err
    # To a format without our metadata, what it cannot keep is said (the grid, the class names), as warnings
    # (`mixer: warning:` lines on the command line).
    with pytest.warns(UserWarning) as warned:
        assert main(["resize", str(tmp_path / "small.safetensors"), "--img-size", "16", "36", "--out",
                     str(tmp_path / "big.npz")]) == 0
    said = " ".join(str(w.message) for w in warned)
    assert "patch grid is not square: load it with img_size=(16, 36)" in said and "no class names" in said
    before = out.read_bytes()
    assert main(["resize", str(out), "--img-size", "32", "72", "--out", str(out)]) == 2  # not over its source
    assert "is the checkpoint being read" in capsys.readouterr().err and out.read_bytes() == before


def test_resizing_a_permuted_run_warns(tmp_path, capsys):
    """A run trained on permuted images (paper Figure 4) gave a resized model with no word that its images need
    a permutation that no command can apply at the new size."""
    import json

    from mlpmixer import save_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(random_mixer((8, 12)), run / "model.safetensors")
    (run / "config.json").write_text(json.dumps({"recipe": {"permute": "patches", "permute_seed": 1}}))
    with pytest.warns(UserWarning, match="fixed 'patches' permutation made for 8×12"):
        assert main(["resize", str(run), "--img-size", "16", "24", "--out", str(tmp_path / "big.safetensors")]) == 0


def test_mode_without_resample_is_refused(tmp_path, capsys):
    """--mode is the interpolation of --method resample; with the default blockdiag it was silently ignored."""
    from mlpmixer import save_checkpoint

    save_checkpoint(random_mixer((8, 12)), tmp_path / "small.safetensors")
    out = tmp_path / "big.safetensors"
    args = ["resize", str(tmp_path / "small.safetensors"), "--img-size", "16", "24", "--out", str(out)]
    assert main([*args, "--mode", "nearest"]) == 2
    err = capsys.readouterr().err
    assert "--mode is the interpolation of --method resample" in err and err.count("\n") == 1 and not out.exists()
    assert main([*args, "--method", "resample", "--mode", "nearest"]) == 0
    assert torch.equal(load_checkpoint(out).blocks[0].mlp_tokens.fc1.weight,
                       resize_to(random_mixer((8, 12)), (16, 24), "resample", "nearest").blocks[0].mlp_tokens.fc1.weight)


def test_an_out_that_cannot_be_written_is_one_sentence_before_the_work(tmp_path, capsys, monkeypatch):
    """A folder as --out said "unknown extension ''"; a place where no file can be created named the temporary
    file with an errno, after the conversion."""
    import os

    from mlpmixer import save_checkpoint

    save_checkpoint(random_mixer((8, 12)), tmp_path / "small.safetensors")
    (tmp_path / "f").write_text("")
    for out, said in ((tmp_path, f"--out {tmp_path} is a folder; give the name of a file to write."),
                      (tmp_path / "f" / "b.safetensors", f"lies under {tmp_path / 'f'}, which is a file; give another --out."),
                      ("/proc/b.safetensors", "--out /proc/b.safetensors: no file can be created in /proc")):
        if str(out).startswith("/proc") and not os.path.isdir("/proc"):  # Linux's, where no file can be created
            continue
        monkeypatch.setattr("mlpmixer.resize.resize_to", lambda *a, **k: pytest.fail("resized before the check"))
        assert main(["resize", str(tmp_path / "small.safetensors"), "--img-size", "16", "24", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1 and "Errno" not in err and ".tmp" not in err, err


def test_an_unreadable_run_configuration_stops_resize_before_it_writes(tmp_path, capsys):
    """The run's config.json was read after --out was written: an error (rc 2) that left a file behind."""
    from mlpmixer import save_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(random_mixer((8, 12)), run / "model.safetensors")
    (run / "config.json").write_text("{not json")
    out = tmp_path / "big.safetensors"
    assert main(["resize", str(run), "--img-size", "16", "24", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'config.json'} cannot be read" in err and err.count("\n") == 1 and not out.exists(), err
