"""The model: shapes, timm-style API, initialisation (SPEC §1), regularisers and input checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from mlpmixer import MixerConfig, MlpMixer, create_model
from mlpmixer.model import DropPath


def images(config: MixerConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, config.in_chans, *config.img_size, generator=g)


def randomise_head(model: MlpMixer) -> None:
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_()


def test_custom_rectangular_greyscale_model(tiny_config: MixerConfig) -> None:
    cfg = tiny_config.replace(in_chans=1, num_classes=7)
    model = create_model(cfg).eval()
    x = images(cfg, batch=3)
    assert model(x).shape == (3, 7)
    feats = model.forward_features(x)
    assert feats.shape == (3, 12, 32) and feats.is_contiguous()  # (B, S, C): a 3×4 grid of tokens
    randomise_head(model)
    with torch.no_grad():
        assert torch.equal(model(x), model.forward_head(feats))
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == (3, 32)
        torch.testing.assert_close(pooled, feats.mean(dim=1))
        torch.testing.assert_close(model(x), pooled @ model.head.weight.T + model.head.bias)


def test_create_model_by_name_with_overrides() -> None:
    model = create_model("S/32", num_classes=3, img_size=(64, 96), hidden_dim=24, num_blocks=2,
                         tokens_mlp_dim=8, channels_mlp_dim=16, in_chans=1)
    assert model.config.num_tokens == 6 and model.config.patch_size == (32, 32)
    assert model(torch.zeros(1, 1, 64, 96)).shape == (1, 3)


def test_tokens_are_patches_in_row_major_order(tiny_config: MixerConfig) -> None:
    """Token i of the stem is the patch at grid position (i // columns, i % columns)."""
    model = create_model(tiny_config)
    x = images(tiny_config, batch=1)
    tokens = model.stem(x)  # (S, B, C)
    conv = nn.functional.conv2d(x, model.stem.proj.weight, model.stem.proj.bias, stride=8)  # (1, C, 3, 4)
    torch.testing.assert_close(tokens[:, 0], conv[0].flatten(1).T)


def test_num_classes_zero_gives_pooled_features(tiny_config: MixerConfig) -> None:
    headless = create_model(tiny_config.replace(num_classes=0)).eval()
    x = images(tiny_config)
    out = headless(x)
    assert out.shape == (2, 32) and isinstance(headless.head, nn.Identity)
    torch.testing.assert_close(out, headless.forward_features(x).mean(dim=1))


def test_reset_classifier(tiny_config: MixerConfig) -> None:
    model = create_model(tiny_config).eval()
    randomise_head(model)
    x = images(tiny_config)
    model.reset_classifier(11)
    assert model.num_classes == 11 and model.config.num_classes == 11
    assert model.get_classifier().weight.shape == (11, 32)
    assert torch.count_nonzero(model(x)) == 0  # a fresh head is zero
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)


def test_a_refused_reset_classifier_changes_nothing(tiny_config: MixerConfig) -> None:
    """The pooling was set before the class count was checked: a refused call left a per-token model behind."""
    model = create_model(tiny_config)
    for num_classes, pool in ((-1, ""), (3, "max")):
        with pytest.raises(ValueError):
            model.reset_classifier(num_classes, pool)
        assert model.global_pool == "avg" and model.num_classes == tiny_config.num_classes
    model.reset_classifier(3, "")
    assert model.global_pool == "" and model(images(tiny_config)).shape == (2, tiny_config.num_tokens, 3)


def test_a_tag_in_the_name_gives_its_weights_classes_without_them() -> None:
    """As timm does: mixer_b16_224.goog_in21k has the 21,843 classes of its weights (it had 1,000 here)."""
    with torch.device("meta"):  # shapes only
        assert create_model("mixer_b16_224.goog_in21k").num_classes == 21843
        assert create_model("mixer_b16_224.goog_in21k", num_classes=3).num_classes == 3
    with pytest.raises(ValueError, match="No pretrained weights 'bogus' for Mixer-B/16: its published tags are"):
        create_model("mixer_b16_224.bogus")


def test_initialisation_follows_flax_defaults() -> None:
    cfg = MixerConfig(patch_size=16, hidden_dim=256, num_blocks=2, tokens_mlp_dim=128,
                      channels_mlp_dim=1024, img_size=224, num_classes=10)
    model = create_model(cfg)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
            assert module.eps == 1e-6
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            assert torch.count_nonzero(module.bias) == 0, name
    # LeCun normal: std sqrt(1/fan_in), truncated at two standard deviations of the underlying normal.
    kernels = {
        "stem (fan_in 3·16·16)": model.stem.proj.weight,
        "token fc1 (fan_in S=196)": model.blocks[0].mlp_tokens.fc1.weight,
        "token fc2 (fan_in D_S=128)": model.blocks[0].mlp_tokens.fc2.weight,
        "channel fc1 (fan_in C=256)": model.blocks[1].mlp_channels.fc1.weight,
        "channel fc2 (fan_in D_C=1024)": model.blocks[1].mlp_channels.fc2.weight,
    }
    for name, w in kernels.items():
        fan_in = w[0].numel()
        expected = math.sqrt(1.0 / fan_in)
        # With ≥ 196k samples the sample std is within about 0.3% of the true one; allow 3%.
        assert abs(w.std().item() / expected - 1) < 0.03, name
        assert abs(w.mean().item()) < 0.02 * expected, name
        assert w.abs().max().item() <= 2 * expected / 0.8796 + 1e-6, name
        # Shaped as a normal cut at ±2σ: 68.27% / 95.45% = 71.52% of the values lie within σ of 0.
        within = (w.abs() < expected / 0.87962566).float().mean().item()
        assert abs(within - 0.7152) < 0.01, name


def test_gelu_choice() -> None:
    tanh = create_model("S/32", num_classes=0, hidden_dim=8, num_blocks=1, tokens_mlp_dim=4, channels_mlp_dim=8)
    exact = create_model("S/32", num_classes=0, hidden_dim=8, num_blocks=1, tokens_mlp_dim=4,
                         channels_mlp_dim=8, gelu="exact")
    assert tanh.blocks[0].mlp_channels.act.approximate == "tanh"
    assert exact.blocks[0].mlp_channels.act.approximate == "none"


def test_stochastic_depth_rises_linearly() -> None:
    cfg = MixerConfig(patch_size=4, hidden_dim=8, num_blocks=5, tokens_mlp_dim=4, channels_mlp_dim=8,
                      img_size=8, drop_path_rate=0.2)
    rates = [block.drop_path.rate for block in create_model(cfg).blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    single = create_model(cfg.replace(num_blocks=1))
    assert single.blocks[0].drop_path.rate == 0.0


def test_drop_path_drops_whole_samples() -> None:
    torch.manual_seed(0)
    drop = DropPath(0.5).train()
    out = drop(torch.ones(6, 64, 3))  # (S, B, C)
    per_sample = out.permute(1, 0, 2).reshape(64, -1)
    kept = per_sample[:, 0] == 2.0
    assert torch.all(per_sample[kept] == 2.0) and torch.all(per_sample[~kept] == 0.0)
    assert 10 < kept.sum() < 54  # about half of 64 survive
    assert torch.equal(drop.eval()(torch.ones(6, 64, 3)), torch.ones(6, 64, 3))
    assert torch.equal(DropPath(1.0).train()(torch.ones(6, 4, 3)), torch.zeros(6, 4, 3))  # all dropped, no 0 / 0


def test_dropout_only_in_training(tiny_config: MixerConfig) -> None:
    model = create_model(tiny_config.replace(drop_rate=0.5, drop_path_rate=0.3))
    randomise_head(model)
    x = images(tiny_config)
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_dropout_rates_are_placed_as_timms(tiny_config: MixerConfig) -> None:
    """drop_rate is dropout before the head only, proj_drop_rate inside the MLPs, as in timm's Mixer (drop_rate
    made 16 dropout layers of a 4-block model, where timm has one)."""
    timm = pytest.importorskip("timm")

    def dropouts(model: nn.Module) -> list[tuple[str, float]]:
        """(where, rate) of each dropout a training forward applies: the head, or the MLP kind it is in."""
        applied = []
        for name, m in model.named_modules():
            if isinstance(m, nn.Dropout) and m.p > 0:
                where = "head" if "blocks" not in name else name.split(".")[2]  # blocks.i.mlp_tokens.drop
                m.register_forward_hook(lambda m, i, o, where=where: applied.append((where, m.p)))
        model.train()(images(tiny_config))
        return sorted(applied)

    for rates in ({"drop_rate": 0.3}, {"proj_drop_rate": 0.2}, {"drop_rate": 0.3, "proj_drop_rate": 0.2}):
        ours = create_model(tiny_config.replace(**rates))
        theirs = timm.models.mlp_mixer.MlpMixer(num_classes=5, img_size=tiny_config.img_size, patch_size=8,
                                                embed_dim=32, num_blocks=tiny_config.num_blocks, **rates)
        assert dropouts(ours) == dropouts(theirs), rates
    assert dropouts(create_model(tiny_config.replace(drop_rate=0.3))) == [("head", 0.3)]


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config: MixerConfig) -> None:
    model = create_model(tiny_config)
    randomise_head(model)
    x = images(tiny_config)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1)


@pytest.mark.parametrize("overrides", [{}, {"num_classes": 0},
                                       {"drop_rate": 0.5, "drop_path_rate": 0.3, "gelu": "exact"}])
def test_torch_jit_script_compiles_the_model(tiny_config: MixerConfig, overrides: dict) -> None:
    """What TorchScript cannot hold (the config behind the input check and timm's properties) is left out."""
    import warnings

    model = create_model(tiny_config.replace(**overrides))
    randomise_head(model)
    with warnings.catch_warnings():  # recent PyTorch marks torch.jit deprecated
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)
        scripted = torch.jit.script(model)
    for mode in (False, True):  # eval, then training with dropout and stochastic depth drawn alike
        model.train(mode)
        scripted.train(mode)
        x = images(tiny_config, batch=3)
        torch.manual_seed(1)
        got = scripted(x)
        torch.manual_seed(1)
        torch.testing.assert_close(got, model(x))


def test_wrong_image_size_names_the_size_and_the_conversion() -> None:
    model = create_model("S/32", hidden_dim=16, num_blocks=1, tokens_mlp_dim=8, channels_mlp_dim=16)
    with pytest.raises(ValueError, match="224×224") as err:
        model(torch.zeros(1, 3, 256, 256))
    message = str(err.value)
    assert "256×256" in message and "resolution" in message and "resize_to" in message
    with pytest.raises(ValueError, match="224×224"):
        model(torch.zeros(1, 3, 224, 192))
    # As many patches on another grid (7×7 = 49 = 1×49): most likely weights loaded at the wrong size.
    with pytest.raises(ValueError, match=r"got 32×1568, which have as many patches: .* img_size=\(32, 1568\)"):
        model(torch.zeros(1, 3, 32, 1568))


def test_wrong_channels_or_rank(tiny_config: MixerConfig) -> None:
    model = create_model(tiny_config)
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\).*\(2, 1, 24, 32\)"):
        model(torch.zeros(2, 1, 24, 32))
    with pytest.raises(ValueError, match="takes images shaped"):
        model(torch.zeros(3, 24, 32))
    with pytest.raises(ValueError, match=r"takes float images .* got torch.uint8; .* x.float\(\) / 127.5 - 1"):
        model(torch.zeros(2, 3, 24, 32, dtype=torch.uint8))
    assert model(torch.zeros(0, 3, 24, 32)).shape == (0, model.num_classes)  # an empty batch, as timm


def test_input_of_another_float_dtype_or_type_is_one_sentence(tiny_config: MixerConfig) -> None:
    import numpy as np

    model = create_model(tiny_config).eval()
    x = images(tiny_config)
    for dtype, hint in ((torch.float64, r"x.to\(torch.float32\) or the model with model.to\(torch.float64\)"),
                        (torch.float16, "got torch.float16 images for a torch.float32 model"),
                        (torch.bfloat16, "got torch.bfloat16 images")):
        with pytest.raises(ValueError, match=hint):
            model(x.to(dtype))
    with pytest.raises(ValueError, match=r"takes a torch tensor of images, got a ndarray; .*torch.from_numpy"):
        model(x.numpy())
    with pytest.raises(ValueError, match="got torch.float32 images for a torch.bfloat16 model"):
        create_model(tiny_config).to(torch.bfloat16)(x)
    # What works is left alone: autocast casts the images and the weights to its own dtype...
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == model(x.to(torch.float16)).dtype == torch.bfloat16
        assert model.to(torch.bfloat16)(x).dtype == torch.bfloat16
        # ...but never a float64 tensor, which it leaves as it is.
        with pytest.raises(ValueError, match="got torch.float64 images for a torch.bfloat16 model"):
            model(x.double())
    assert model.double()(x.double()).dtype == torch.float64


def test_timm_style_calls(tiny_config: MixerConfig) -> None:
    """What timm users write: pretrained=False, reset_classifier(n, 'avg'), mlpmixer.<submodule>."""
    import subprocess
    import sys

    assert create_model(tiny_config, pretrained=False).num_classes == tiny_config.num_classes
    assert create_model(tiny_config, False).num_classes == tiny_config.num_classes  # timm's second argument
    with pytest.raises(ValueError, match=r"second argument is pretrained .* not 10; .* num_classes=10"):
        create_model(tiny_config, 10)
    model = create_model(tiny_config)
    model.reset_classifier(4, "avg")
    assert model.num_classes == 4
    with pytest.raises(ValueError, match="pools its tokens by the mean"):
        model.reset_classifier(4, "max")
    # Submodules are attributes of the package once asked for, as after `import mlpmixer.fast`.
    code = "import mlpmixer; print(callable(mlpmixer.fast.optimize), callable(mlpmixer.pretrained.fold_input_normalisation))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["True", "True"], done.stderr


def test_create_model_takes_timms_device_dtype_and_old_names_and_says_what_it_does_not_take() -> None:
    meta = create_model("H/14", device="meta")  # built there: no memory, no initialisation
    assert all(p.is_meta for p in meta.parameters())
    assert create_model("S/32", num_blocks=1, dtype=torch.bfloat16).head.weight.dtype == torch.bfloat16
    old = create_model("mixer_b16_224_miil_in21k")  # timm's former name of mixer_b16_224.miil_in21k
    assert old.config.describe() == "Mixer-B/16" and old.num_classes == 11221
    with pytest.raises(ValueError, match=r"does not take act_layer \(gelu='exact' or 'tanh' sets the activation\); "
                       r"it takes num_classes, img_size, global_pool, device, dtype and .*proj_drop_rate"):
        create_model("S/32", act_layer=nn.GELU)


def test_timms_hub_tools_save_a_model_that_timm_builds(tmp_path) -> None:
    """timm.models.push_to_hf_hub writes config.json through save_for_hf, which needs pretrained_cfg's
    architecture (a KeyError before): timm's name for the shapes, whose model then takes the saved weights."""
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    model = create_model("S/32", gelu="exact", num_classes=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    save_for_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "mixer_s32_224" and config["pretrained_cfg"]["fixed_input_size"] is True
    weights = next(p for p in tmp_path.iterdir() if p.name != "config.json")
    theirs = timm.create_model(config["architecture"], num_classes=4, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(weights), num_classes=4)).eval()
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-5)
    assert create_model("digits/7").pretrained_cfg["architecture"] == "Mixer-digits/7"  # a shape timm lacks


def test_runs_on_the_meta_device(tiny_config: MixerConfig) -> None:
    """Shapes without data, as timm's Mixer gives them (the input check's autocast query raised there)."""
    from mlpmixer.fast import optimize

    with torch.device("meta"):
        model = create_model(tiny_config)
    x = torch.empty(2, tiny_config.in_chans, *tiny_config.img_size, device="meta")
    assert model(x).shape == (2, tiny_config.num_classes) and model(x).is_meta
    fast = optimize(model)
    assert fast(x).shape == (2, tiny_config.num_classes)
    with torch.no_grad():
        assert fast.eval()(x).shape == (2, tiny_config.num_classes)


def same_weights_as_timm(cfg: MixerConfig) -> tuple[MlpMixer, nn.Module]:
    """Our model of `cfg` (C 32, D_S 16, D_C 64, exact GELU) with random weights, and timm's with the same ones."""
    timm = pytest.importorskip("timm")
    ours = create_model(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
    theirs = timm.models.mlp_mixer.MlpMixer(num_classes=cfg.num_classes, img_size=cfg.img_size, patch_size=8,
                                            num_blocks=cfg.num_blocks, embed_dim=32, mlp_ratio=(0.5, 2.0)).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def test_forward_intermediates_match_timms(tiny_config: MixerConfig) -> None:
    cfg = tiny_config.replace(num_blocks=3, gelu="exact")  # timm's GELU
    ours, theirs = same_weights_as_timm(cfg)
    x = images(cfg)
    with torch.no_grad():
        for kwargs in ({}, dict(indices=2, norm=True), dict(indices=[0, -1], output_fmt="NLC"),
                       dict(indices=[0], stop_early=True), dict(indices=[1], stop_early=True, norm=True)):
            final, taps = ours.forward_intermediates(x, **kwargs)
            want_final, want_taps = theirs.forward_intermediates(x, **kwargs)
            torch.testing.assert_close(final, want_final)
            assert len(taps) == len(want_taps) and all(t.is_contiguous() for t in taps)
            for got, want in zip(taps, want_taps):
                torch.testing.assert_close(got, want)
        # The last block's tap, normalised, is the features; stop_early skips the later blocks.
        (last,) = ours.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        torch.testing.assert_close(last.flatten(2).transpose(1, 2), ours.forward_features(x))
        (first,) = ours.forward_intermediates(x, indices=[0], intermediates_only=True, stop_early=True)
        torch.testing.assert_close(first, ours.blocks[0](ours.stem(x)).permute(1, 2, 0).reshape(2, 32, 3, 4))
    assert [f["module"] for f in ours.feature_info] == ["blocks.0", "blocks.1", "blocks.2"]
    for bad in (0, 4, [3], [-4]):
        with pytest.raises(ValueError, match="has 3 blocks"):
            ours.forward_intermediates(x, indices=bad)
        with pytest.raises(ValueError, match="has 3 blocks"):
            ours.prune_intermediate_layers(bad)


def test_no_pooling_and_pruning_match_timms(tiny_config: MixerConfig) -> None:
    """timm's global_pool '' (the head on every token), head_hidden_size and prune_intermediate_layers."""
    cfg = tiny_config.replace(num_blocks=3, gelu="exact")
    x = images(cfg)
    ours, theirs = same_weights_as_timm(cfg)
    assert ours.head_hidden_size == theirs.head_hidden_size == 32
    with torch.no_grad():
        ours.reset_classifier(7, "")
        theirs.reset_classifier(7, "")
        randomise_head(ours)
        theirs.head.load_state_dict(ours.head.state_dict())
        logits = ours(x)
        assert logits.shape == (2, 12, 7)  # (B, S, classes)
        torch.testing.assert_close(logits, theirs(x))
        torch.testing.assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True),
                                   ours.forward_features(x))
        ours.reset_classifier(7, "avg")  # back to the mean
        assert ours(x).shape == (2, 7)
    assert create_model(cfg, global_pool="")(x).shape == (2, 12, cfg.num_classes)
    with pytest.raises(ValueError, match=r"by the mean \('avg'\) or not at all \(''\); global_pool='max'"):
        create_model(cfg, global_pool="max")

    for kwargs in (dict(indices=[0]), dict(indices=2, prune_norm=True), dict(indices=1, prune_head=False)):
        ours, theirs = same_weights_as_timm(cfg)
        assert ours.prune_intermediate_layers(**kwargs) == theirs.prune_intermediate_layers(**kwargs)
        assert len(ours.blocks) == ours.config.num_blocks == len(theirs.blocks)
        assert ours.num_classes == theirs.num_classes and ours.global_pool == theirs.global_pool
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x))


def test_pretrained_cfg_is_stored(tiny_config: MixerConfig) -> None:
    """As timm's: an edit stays, and reaches timm.data; a new head updates its classes."""
    timm = pytest.importorskip("timm")
    import timm.data

    model = create_model(tiny_config)
    assert model.pretrained_cfg is model.default_cfg and model.pretrained_cfg["num_classes"] == 5
    model.pretrained_cfg["mean"] = (0.4, 0.4, 0.4)
    assert timm.data.resolve_data_config({}, model=model)["mean"] == (0.4, 0.4, 0.4)
    model.reset_classifier(9)
    assert model.pretrained_cfg["num_classes"] == 9 and model.pretrained_cfg["mean"] == (0.4, 0.4, 0.4)


def test_timms_data_and_optimiser_tools_take_our_model(tiny_config: MixerConfig) -> None:
    timm = pytest.importorskip("timm")
    import timm.data
    import timm.optim

    model = create_model(tiny_config.replace(in_chans=1))
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (1, 24, 32) and data["mean"] == (0.5,) and data["std"] == (0.5,)
    from torchvision.transforms.v2.functional import to_pil_image

    from mlpmixer.transforms import eval_transform

    # timm's pipeline gives our input: [-1, 1], and the official "resize" evaluation, also of an image
    # of another shape (a centre crop would cut its sides off).
    pixels = torch.randint(0, 256, (1, 40, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    theirs = timm.data.create_transform(**data)(to_pil_image(pixels))
    assert theirs.shape == (1, 24, 32)
    # PIL's resize and torchvision's round a few pixels apart: one grey level (2/255 in [-1, 1]) at most.
    torch.testing.assert_close(theirs, eval_transform((24, 32), 1, "resize")(pixels), atol=1.01 * 2 / 255, rtol=0)
    # Layer-wise learning-rate decay groups the stem, each block, then the final norm and the head.
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1.0, layer_decay=0.5)
    scales = {round(g["lr_scale"], 6) for g in optimizer.param_groups}
    assert scales == {0.125, 0.25, 0.5, 1.0}


@pytest.mark.parametrize("prune_norm", [False, True])
def test_a_pruned_model_saves_only_what_loads_back(tiny_config: MixerConfig, tmp_path, prune_norm: bool) -> None:
    from mlpmixer.checkpoints import CheckpointError, load_checkpoint, save_checkpoint

    model = create_model(tiny_config.replace(num_blocks=3))
    model.prune_intermediate_layers(1, prune_norm=prune_norm)
    path = tmp_path / "pruned.safetensors"
    if prune_norm:  # a file of its config would need the norm's weights
        with pytest.raises(CheckpointError, match="final LayerNorm was pruned .* save it before pruning"):
            save_checkpoint(model, path)
        assert not path.exists()
    else:  # fewer blocks, no head: a model of its own (the pooling, as in timm, is the caller's choice)
        save_checkpoint(model, path)
        x = images(model.config)
        with torch.no_grad():
            torch.testing.assert_close(load_checkpoint(path).forward_features(x), model.forward_features(x))
