"""Weight formats (issue 2, item 3): round trips, configuration in our files, mismatches, bad input."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import stat
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mlpmixer import CheckpointError, MixerConfig, convert, create_model, load_checkpoint, save_checkpoint
from mlpmixer.checkpoints import RUN_MODEL_FILE, atomic_write, read_checkpoint
from mlpmixer.cli import main

SQUARE = MixerConfig(patch_size=8, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16, channels_mlp_dim=64,
                     img_size=32, num_classes=5)


def random_model(config: MixerConfig, seed: int = 0) -> torch.nn.Module:
    """A model whose every tensor (the head too) is random, so any lost or swapped tensor shows."""
    model = create_model(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def caught(action: Callable[[], Any]) -> tuple[Any, list[str]]:
    """What `action()` returns, and the messages of the warnings it gives."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = action()
    return result, [str(w.message) for w in seen]


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --- round trips --------------------------------------------------------------------------------


def test_lossless_round_trip_through_every_format(tmp_path: Path) -> None:
    original = random_model(SQUARE)
    save_checkpoint(original, tmp_path / "a.npz")
    npz_before = dict(np.load(tmp_path / "a.npz"))
    chain = ["b.safetensors", "c.pth", "d.bin", "e.pt", "f.npz", "g.safetensors"]
    src = tmp_path / "a.npz"
    for name in chain:
        convert(src, tmp_path / name)
        src = tmp_path / name
    for name in ["a.npz", *chain]:
        assert_same_state(original, load_checkpoint(tmp_path / name))
    npz_after = dict(np.load(tmp_path / "f.npz"))
    assert npz_before.keys() == npz_after.keys()
    assert all(np.array_equal(npz_before[k], npz_after[k]) for k in npz_before)
    # The official layout and shapes of SPEC §6.
    assert npz_after["stem/kernel"].shape == (8, 8, 3, 32)
    assert npz_after["MixerBlock_1/token_mixing/Dense_0/kernel"].shape == (16, 16)  # (S, D_S)
    assert npz_after["MixerBlock_1/channel_mixing/Dense_0/kernel"].shape == (32, 64)  # (C, D_C)
    assert npz_after["head/kernel"].shape == (32, 5) and "pre_head_layer_norm/scale" in npz_after


def test_npz_keeps_float64_and_widens_bfloat16(tmp_path: Path) -> None:
    model = random_model(SQUARE).double()
    save_checkpoint(model, tmp_path / "f64.npz")
    assert np.load(tmp_path / "f64.npz")["stem/bias"].dtype == np.float64
    bf16 = random_model(SQUARE).to(torch.bfloat16)
    save_checkpoint(bf16, tmp_path / "bf16.npz")
    assert np.load(tmp_path / "bf16.npz")["stem/bias"].dtype == np.float32
    back = load_checkpoint(tmp_path / "bf16.npz")
    assert torch.equal(back.stem.proj.weight, bf16.stem.proj.weight.float())


def test_our_safetensors_rebuilds_the_model_alone(tmp_path: Path) -> None:
    cfg = MixerConfig(patch_size=(4, 8), hidden_dim=16, num_blocks=2, tokens_mlp_dim=8, channels_mlp_dim=32,
                      img_size=(12, 40), in_chans=1, num_classes=3, gelu="exact", drop_path_rate=0.1)
    model = random_model(cfg)
    model.class_names = ["cat", "dog", "fish"]
    save_checkpoint(model, tmp_path / "m.safetensors")
    back = load_checkpoint(tmp_path / "m.safetensors")
    assert back.config == cfg and back.class_names == ["cat", "dog", "fish"]
    assert_same_state(model, back)
    x = torch.randn(2, 1, 12, 40)
    with torch.no_grad():
        assert torch.equal(model(x), back.eval()(x))


def test_headless_npz_gives_a_headless_model(tmp_path: Path) -> None:
    headless = random_model(SQUARE.replace(num_classes=0))
    save_checkpoint(headless, tmp_path / "h.npz")
    assert not any(k.startswith("head/") for k in np.load(tmp_path / "h.npz").files)
    back = load_checkpoint(tmp_path / "h.npz")
    assert back.num_classes == 0 and back(torch.zeros(1, 3, 32, 32)).shape == (1, 32)
    # A head on request: new and zero.
    with_head = load_checkpoint(tmp_path / "h.npz", num_classes=4)
    assert with_head.num_classes == 4 and torch.count_nonzero(with_head.head.weight) == 0


def test_num_classes_override_gives_a_zero_head(tmp_path: Path) -> None:
    model = random_model(SQUARE)
    model.class_names = list("abcde")
    save_checkpoint(model, tmp_path / "m.safetensors")
    tuned = load_checkpoint(tmp_path / "m.safetensors", num_classes=10)
    assert tuned.num_classes == 10 and tuned.class_names is None  # the names went with the old head
    assert torch.count_nonzero(tuned.head.weight) == 0 and torch.count_nonzero(tuned.head.bias) == 0
    assert torch.equal(tuned.blocks[1].mlp_tokens.fc2.weight, model.blocks[1].mlp_tokens.fc2.weight)
    same = load_checkpoint(tmp_path / "m.safetensors", num_classes=5)  # same count: the file's head
    assert torch.equal(same.head.weight, model.head.weight) and same.class_names == list("abcde")
    features = load_checkpoint(tmp_path / "m.safetensors", num_classes=0)
    assert features(torch.zeros(1, 3, 32, 32)).shape == (1, 32)


def test_loaded_models_are_ordinary_trainable_models(tmp_path: Path) -> None:
    """Models are built without initialising and then given the file's tensors: check they are real."""
    save_checkpoint(random_model(SQUARE), tmp_path / "m.npz")
    for kwargs in ({}, {"num_classes": 3}):
        model = load_checkpoint(tmp_path / "m.npz", **kwargs).train()
        params = dict(model.named_parameters())
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 and p.requires_grad for p in params.values())
        before = params["head.weight"].detach().clone()
        torch.optim.SGD(model.parameters(), lr=0.1).zero_grad()
        model(torch.randn(2, 3, 32, 32)).sum().backward()  # not squared: a zero head still gets gradient
        assert all(p.grad is not None for p in params.values())
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        assert not torch.equal(before, params["head.weight"])


def test_run_directory(tmp_path: Path) -> None:
    model = random_model(SQUARE)
    save_checkpoint(model, tmp_path / "run" / RUN_MODEL_FILE)
    assert_same_state(model, load_checkpoint(tmp_path / "run"))
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(CheckpointError, match=f"without {RUN_MODEL_FILE}"):
        load_checkpoint(tmp_path / "unfinished")


def test_timm_layout_variants_load(tmp_path: Path) -> None:
    """Training scripts nest state dicts or prefix keys (DataParallel, torch.compile)."""
    model = random_model(SQUARE)
    state = model.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "a.pth")
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in state.items()}}, tmp_path / "b.pt")
    for name in ("a.pth", "b.pt"):
        back = load_checkpoint(tmp_path / name)
        assert back.config.gelu == "exact"
        assert_same_state(model, back)


def test_load_into_a_given_model(tmp_path: Path) -> None:
    model = random_model(SQUARE)
    save_checkpoint(model, tmp_path / "m.pth")
    target = create_model(SQUARE)
    target.class_names = list("vwxyz")
    assert load_checkpoint(tmp_path / "m.pth", model=target) is target
    assert_same_state(model, target)
    assert target.class_names == list("vwxyz")  # the file has no names: the model keeps its own


def test_wrapped_models_save_as_the_model_itself(tmp_path: Path) -> None:
    """What training and inference wrap a model in saves as the model: it loads back in every format."""
    from mlpmixer.compiled import CompiledOrEager
    from mlpmixer.fast import optimize

    model = random_model(SQUARE)
    for wrapper, ext in ((optimize, ".safetensors"), (CompiledOrEager, ".npz"), (torch.compile, ".pth")):
        path = save_checkpoint(wrapper(model), tmp_path / f"{wrapper.__name__}{ext}")
        assert_same_state(model, load_checkpoint(path, gelu=model.config.gelu))
    with pytest.raises(CheckpointError, match="takes an MlpMixer .* not a Linear"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "linear.safetensors")


def test_names_and_overrides_that_cannot_apply_are_refused(tmp_path: Path) -> None:
    model = random_model(SQUARE)
    with pytest.raises(CheckpointError, match="1 class names do not fit the 5-class head"):
        save_checkpoint(model, tmp_path / "m.safetensors", class_names=["only one"])
    assert not (tmp_path / "m.safetensors").exists()
    save_checkpoint(model, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="loads into the given model as it is; num_classes cannot change it"):
        load_checkpoint(tmp_path / "m.safetensors", model=random_model(SQUARE), num_classes=7)


def test_save_is_atomic_and_readable(tmp_path: Path) -> None:
    model = random_model(SQUARE)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not a private 0600 temp file

    def broken(tmp: str) -> None:
        Path(tmp).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]
    assert_same_state(model, load_checkpoint(path))  # the old file is intact
    with pytest.raises(CheckpointError, match="unknown extension '.h5'"):
        save_checkpoint(model, tmp_path / "m.h5")


@pytest.mark.parametrize("dst", ["{tmp}", "{tmp}/", "{tmp}/m.safetensors/", "{tmp}/new/"])
def test_a_folder_to_write_to_is_refused(tmp_path: Path, dst: str) -> None:
    """A folder, or a path ending in a slash, is not a file to write (Path would drop the slash and write
    "m.safetensors/" as a file); nothing is written."""
    with pytest.raises(CheckpointError, match=r"it names a folder; give the file to write, ending in one of .*"
                                              r"\(say .*model\.safetensors\)\."):
        save_checkpoint(random_model(SQUARE), dst.format(tmp=tmp_path))
    assert os.listdir(tmp_path) == []


def test_a_path_under_a_file_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """mkdir's "[Errno 17] File exists: 'x'" (or "[Errno 20] Not a directory") would not say which part is wrong."""
    save_checkpoint(random_model(SQUARE), tmp_path / "model.safetensors")
    (tmp_path / "afile").write_text("not a folder")
    for dst in (tmp_path / "afile" / "out.pth", tmp_path / "afile" / "sub" / "out.npz"):
        code, _, err = run_cli(["convert", tmp_path / "model.safetensors", dst], capsys)
        assert code == 2 and err == (f"mixer convert: error: Cannot write {dst}: it lies under {tmp_path / 'afile'}, "
                                     "which is a file; give a path in a folder.\n"), err


def test_convert_warns_of_nothing_when_the_file_cannot_be_written(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """What a .npz file loses (GELU, class names) was warned of before the write failed, for a file never written."""
    exact = random_model(SQUARE.replace(gelu="exact"))
    exact.class_names = [f"c{i}" for i in range(exact.num_classes)]
    save_checkpoint(exact, tmp_path / "e.safetensors")
    (tmp_path / "afile").write_text("not a folder")
    cases = [(tmp_path / "afile" / "e.npz", "which is a file; give a path in a folder.")]
    if os.path.isdir("/proc"):  # Linux's, where no file can be created (root passes os.access there)
        # One sentence naming the path given, not errno's line naming our temporary file.
        cases.append((Path("/proc/e.npz"), "Cannot write /proc/e.npz: no file can be created in /proc"))
    for dst, error in cases:
        (code, _, err), said = caught(lambda: run_cli(["convert", tmp_path / "e.safetensors", dst], capsys))
        assert code == 2 and said == [] and error in err and err.count("\n") == 1, (said, err)
    (code, _, _), said = caught(lambda: run_cli(["convert", tmp_path / "e.safetensors", tmp_path / "e.npz"], capsys))
    assert code == 0 and len(said) == 2  # written: both losses are said


def test_cli_info_describes_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = random_model(SQUARE.replace(gelu="exact", in_chans=1))
    model.class_names = [f"class {i}" for i in range(5)]
    save_checkpoint(model, tmp_path / "m.safetensors")
    code, out, _ = run_cli(["info", tmp_path / "m.safetensors"], capsys)
    assert code == 0 and "Mixer(C=32, N=2, P=8)" in out and "32×32, 1 channel; patch 8×8, 16 tokens" in out
    assert "exact GELU" in out and "5 classes" in out and "class 0, class 1" in out and "layout" not in out
    assert f"{SQUARE.num_params() - 2 * 32 * 8 * 8:,} parameters" in out  # one input channel, not three
    # An official file says nothing of its GELU or class names: what was assumed is said.
    save_checkpoint(model, tmp_path / "m.npz")
    code, out, _ = run_cli(["info", tmp_path / "m.npz", "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["layout"] == "official" and info["config"]["gelu"] == "tanh"
    assert info["class_names"] is None and info["params"] == model.config.num_params()
    code, _, err = run_cli(["info", tmp_path / "m.npz", "--num-classes", "3"], capsys)
    assert code == 2 and "a checkpoint has its own head" in err
    # A rectangular grid that the file does not size: --img-size H W, as for convert.
    save_checkpoint(random_model(SQUARE.replace(img_size=(32, 16))), tmp_path / "r.npz")
    code, _, err = run_cli(["info", tmp_path / "r.npz"], capsys)
    assert code == 2 and "--img-size H W" in err
    code, out, _ = run_cli(["info", tmp_path / "r.npz", "--img-size", "32", "16"], capsys)
    assert code == 0 and "32×16" in out
    # A file that gives its size (ours; a square grid) was described at that size, --img-size silently ignored.
    for file, size in ((tmp_path / "m.safetensors", "32×32"), (tmp_path / "m.npz", "32×32")):
        code, out, err = run_cli(["info", file, "--img-size", "64"], capsys)
        assert code == 2 and out == "" and err.count("\n") == 1 and f"is made for {size} images" in err, err
        code, out, _ = run_cli(["info", file, "--img-size", "32"], capsys)
        assert code == 0 and "32×32" in out
    code, _, err = run_cli(["info", tmp_path / "none.npz"], capsys)
    assert code == 2 and "No checkpoint at" in err


def test_cli_convert(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = random_model(SQUARE)
    save_checkpoint(model, tmp_path / "m.npz")
    code, out, _ = run_cli(["convert", tmp_path / "m.npz", tmp_path / "m.safetensors"], capsys)
    assert code == 0 and "Wrote Mixer(C=32, N=2, P=8) (5 classes)" in out and str(tmp_path / "m.safetensors") in out
    assert_same_state(model, load_checkpoint(tmp_path / "m.safetensors"))
    # Said as warnings (`mixer: warning: ...` lines on the command line, test_cli checks that format).
    (code, _, _), said = caught(lambda: run_cli(["convert", tmp_path / "m.npz", tmp_path / "m.pth"], capsys))
    assert code == 0 and len(said) == 1 and "gelu='tanh'" in said[0]  # timm files imply exact GELU: the user is told
    # The other way round: an exact-GELU model with class names, written as .npz, loses both; both are said.
    exact = random_model(SQUARE.replace(gelu="exact"))
    exact.class_names = [f"c{i}" for i in range(exact.num_classes)]
    save_checkpoint(exact, tmp_path / "e.safetensors")
    (code, _, _), said = caught(lambda: run_cli(["convert", tmp_path / "e.safetensors", tmp_path / "e.npz"], capsys))
    assert code == 0 and "load with tanh GELU" in said[0] and "--gelu exact" in said[0] and "no class names" in said[1]
    (code, _, _), said = caught(lambda: run_cli(["convert", tmp_path / "e.npz", tmp_path / "e2.safetensors",
                                                 "--gelu", "exact"], capsys))
    assert code == 0 and said == []
    back = load_checkpoint(tmp_path / "e2.safetensors")
    assert back.config.gelu == "exact"
    assert_same_state(exact, back)
    # A rectangular grid needs its size on the command line.
    rect = random_model(SQUARE.replace(img_size=(32, 16)))
    save_checkpoint(rect, tmp_path / "r.npz")
    code, _, err = run_cli(["convert", tmp_path / "r.npz", tmp_path / "r.safetensors"], capsys)
    assert code != 0 and "--img-size" in err
    code, _, _ = run_cli(["convert", tmp_path / "r.npz", tmp_path / "r.safetensors", "--img-size", "32", "16"],
                         capsys)
    assert code == 0 and load_checkpoint(tmp_path / "r.safetensors").config.img_size == (32, 16)
    code, _, err = run_cli(["convert", tmp_path / "r.safetensors", tmp_path / "r.safetensors"], capsys)
    assert code != 0 and "is the checkpoint being read" in err


def test_commands_do_not_write_over_a_runs_files(tmp_path, capsys):
    """export, convert, resize and show-weights wrote over a run's model or a training state without a word
    (a --resume then found no readable state); a run is a folder with its config.json."""
    from mlpmixer.cli import main

    run = tmp_path / "run"
    assert main(["train", "--steps", "2", "--save-every", "2", "--batch-size", "16", "--quiet", "--out", str(run)]) == 0
    state = run / "checkpoints" / "step-00000002.pt"
    files = {p: p.read_bytes() for p in (run / "model.safetensors", state, run / "curves.png")}
    capsys.readouterr()
    for argv, dst in ((["convert", str(state), str(run / "model.safetensors")], run / "model.safetensors"),
                      (["export", str(run), "--format", "torchscript", "--out", str(state)], state),
                      (["resize", str(state), "--img-size", "56", "--out", str(run / "model.safetensors")],
                       run / "model.safetensors"),
                      (["show-weights", str(run), "--out", str(run / "curves.png")], run / "curves.png")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{dst} is " in err and f"of the run in {run}, which the commands reading the run (and --resume) need; " \
            "write to another file." in err, err
    assert all(p.read_bytes() == content for p, content in files.items())
    # Beside a copy of the model outside any run, the same commands write as they did; so does an export next to a
    # training state (step-00000002.onnx is not one), into a folder whose config.json is another tool's (a Hugging
    # Face model's), and through a link into a run (the link is replaced, not the run's file).
    assert main(["convert", str(state), str(tmp_path / "model.safetensors")]) == 0
    assert main(["export", str(state), "--format", "onnx"]) == 0 and state.with_suffix(".onnx").exists()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert main(["convert", str(state), str(tmp_path / "hf" / "model.safetensors")]) == 0
    (tmp_path / "link.png").symlink_to(run / "curves.png")
    assert main(["show-weights", str(run), "--out", str(tmp_path / "link.png")]) == 0
    assert (run / "curves.png").read_bytes() == files[run / "curves.png"] and not (tmp_path / "link.png").is_symlink()


# --- mismatches ---------------------------------------------------------------------------------


def test_mismatch_lists_missing_unexpected_and_misshaped_keys(tmp_path: Path) -> None:
    state = random_model(SQUARE).state_dict()
    del state["blocks.1.norm2.bias"]
    state["blocks.1.extra.weight"] = torch.zeros(3)
    state["blocks.0.mlp_channels.fc2.bias"] = torch.zeros(33)
    torch.save(state, tmp_path / "bad.pth")
    for kwargs in ({}, {"model": create_model(SQUARE)}):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(tmp_path / "bad.pth", **kwargs)
        message = str(err.value)
        assert "missing keys: blocks.1.norm2.bias" in message
        assert "unexpected keys: blocks.1.extra.weight" in message
        assert "mis-shaped: blocks.0.mlp_channels.fc2.bias (33,) vs (32,)" in message


def test_checkpoint_of_another_variant_names_both(tmp_path: Path) -> None:
    with torch.device("meta"):
        shapes = create_model("S/32").state_dict()
        target = create_model("B/32")
    torch.save({k: torch.zeros(v.shape) for k, v in shapes.items()}, tmp_path / "s32.pth")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "s32.pth", model=target)
    assert str(err.value) == (
        f"{tmp_path / 's32.pth'} holds a Mixer-S/32 with 1000 classes at 224×224, which does not fit the "
        "Mixer-B/32 with 1000 classes at 224×224 it is loaded into: the shapes of its weights fix "
        "channels_mlp_dim=2048, hidden_dim=512, num_blocks=8, tokens_mlp_dim=256, and the model has "
        "channels_mlp_dim=3072, hidden_dim=768, num_blocks=12, tokens_mlp_dim=384, so build the model from the "
        "file instead (mlpmixer.load_checkpoint(path)), or pick a checkpoint of that model.")
    # The shapes the file fixes win over an override, and the message says what the file holds.
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "s32.pth", patch_size=16)
    assert str(err.value).startswith(f"{tmp_path / 's32.pth'} holds a Mixer-S/32 with 1000 classes at 224×224, "
                                     "which cannot load as a Mixer-S/16 with 1000 classes at 224×224 "
                                     "(patch_size=16): the shapes of its weights fix patch_size=(32, 32), so load "
                                     "it without that override")


def test_loading_into_a_model_of_another_size_says_what_to_do(tmp_path: Path) -> None:
    """Into a model (plain or fast.optimize's) of another variant, size or head: one sentence with the fix."""
    from mlpmixer.fast import optimize

    model = random_model(SQUARE)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    fast = optimize(create_model(SQUARE))
    assert load_checkpoint(path, model=fast) is fast
    assert_same_state(model, fast.model)
    for target, text in (
        (optimize(create_model(SQUARE.replace(num_blocks=3))), "fix num_blocks=2, and the model has num_blocks=3"),
        (create_model(SQUARE.replace(in_chans=1)), "fix in_chans=3, and the model has in_chans=1"),
        (create_model(SQUARE.replace(img_size=64)), "fix 16 tokens, not 64, so load it at its own size and convert "
                                                    "it with mlpmixer.resize_to(model, (64, 64))"),
        (create_model(SQUARE.replace(num_classes=10)), "build it with mlpmixer.load_checkpoint(path, num_classes=10)"),
    ):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path, model=target)
        message = str(err.value)
        assert message.startswith(f"{path} holds a Mixer(C=32, N=2, P=8) with 5 classes at 32×32, which does not "
                                  f"fit the {target.config.describe()} with {target.config.num_classes} classes at "
                                  f"{target.config.img_size[0]}×{target.config.img_size[1]} it is loaded into: ")
        assert text in message and "keys" not in message and message.endswith("."), message


@pytest.mark.parametrize("name", ["m.safetensors", "m.npz", "m.pth"])
def test_overrides_that_change_the_shapes_say_what_the_file_holds(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    caught(lambda: save_checkpoint(random_model(SQUARE), path))
    held = f"{path} holds a Mixer(C=32, N=2, P=8) with 5 classes at 32×32, which cannot load as a "
    for overrides, target, fix in (
        ({"in_chans": 1}, "Mixer(C=32, N=2, P=8) with 5 classes at 32×32 (in_chans=1)",
         "the shapes of its weights fix in_chans=3, so load it without that override"),
        ({"hidden_dim": 12}, "Mixer(C=12, N=2, P=8) with 5 classes at 32×32 (hidden_dim=12)",
         "the shapes of its weights fix hidden_dim=32, so load it without that override"),
    ):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path, **overrides)
        assert str(err.value).startswith(held + target + ": " + fix), str(err.value)
    # An image size only names the size of a file that does not record it, as many tokens as it has.
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, img_size=64)
    assert str(err.value).startswith(f"{path} is made for 32×32 images, not 64×64: an image size given with a "
                                     "checkpoint (img_size=, --img-size) only names the size of a file that does not "
                                     "record it, and gives as many patches as the file has tokens (16); leave it out, "
                                     "or convert the model to another size with mlpmixer.resize_to (mixer resize)")
    # What the shapes allow still loads: a new head, or, for a file that does not record its size, another image
    # size of as many tokens (a 2×8 grid for a 4×4 one: ours records 4×4, and relabelling it is refused).
    assert load_checkpoint(path, num_classes=3).num_classes == 3
    if name == "m.safetensors":
        with pytest.raises(CheckpointError, match="is made for 32×32 images, not 16×64"):
            load_checkpoint(path, img_size=(16, 64))
    else:
        assert load_checkpoint(path, img_size=(16, 64)).config.img_size == (16, 64)


# --- bad input: each a CheckpointError with one sentence, nothing unpickled ---------------------


class Payload:
    """Unpickling this would create the marker file: proof that a loader executed the file's code."""

    marker: Path

    def __reduce__(self):  # noqa: D105
        return (Path.touch, (self.marker,))


def payload(marker: Path) -> Payload:
    p = Payload()
    p.marker = marker
    return p


def timm_training_checkpoint(model: torch.nn.Module) -> dict[str, Any]:
    """What timm's train.py (CheckpointSaver) saves as model_best.pth.tar: its arguments as an argparse.Namespace."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {"epoch": 3, "arch": "mixer_b16_224", "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(), "version": 2, "metric": 81.5,
            "args": argparse.Namespace(model="mixer_b16_224", lr=0.1, epochs=300)}


def bad_files(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    marker = folder / "EXECUTED"
    good = random_model(SQUARE)

    for ext in (".npz", ".pth", ".safetensors"):
        save_checkpoint(good, folder / f"good{ext}")
        data = (folder / f"good{ext}").read_bytes()
        files[f"truncated{ext}"] = folder / f"truncated{ext}"
        files[f"truncated{ext}"].write_bytes(data[: len(data) // 2])
        flipped = bytearray(data)  # a weight's bytes changed, the file's structure intact
        flipped[len(data) // 2: len(data) // 2 + 16] = bytes(b ^ 0xFF for b in data[len(data) // 2:][:16])
        files[f"flipped{ext}"] = folder / f"flipped{ext}"
        files[f"flipped{ext}"].write_bytes(bytes(flipped))
        files[f"random{ext}"] = folder / f"random{ext}"
        files[f"random{ext}"].write_bytes(np.random.default_rng(0).bytes(4096))
        files[f"empty{ext}"] = folder / f"empty{ext}"
        files[f"empty{ext}"].write_bytes(b"")

    files["object-array.npz"] = folder / "object-array.npz"
    np.savez(files["object-array.npz"], **{"stem/kernel": np.array([payload(marker)], dtype=object)})
    files["pickle.npz"] = folder / "pickle.npz"  # a bare pickle with the npz extension
    files["pickle.npz"].write_bytes(pickle.dumps({"stem/kernel": payload(marker)}))
    files["npy-as.npz"] = folder / "npy-as.npz"
    with open(files["npy-as.npz"], "wb") as f:
        np.save(f, np.zeros(3, np.float32))
    files["ints.npz"] = folder / "ints.npz"
    np.savez(files["ints.npz"], **{"stem/kernel": np.zeros((8, 8, 3, 32), np.int64)})
    files["flat-stem.npz"] = folder / "flat-stem.npz"
    np.savez(files["flat-stem.npz"], **{"stem/kernel": np.zeros(3, np.float32)})
    files["vit.npz"] = folder / "vit.npz"
    np.savez(files["vit.npz"], **{"Transformer/encoder_norm/scale": np.ones(4, np.float32)})

    files["pickle.pth"] = folder / "pickle.pth"  # a bare malicious pickle
    files["pickle.pth"].write_bytes(pickle.dumps({"stem.proj.weight": payload(marker)}))
    files["torch-pickle.bin"] = folder / "torch-pickle.bin"  # torch's zip format, malicious object inside
    torch.save({"stem.proj.weight": payload(marker)}, files["torch-pickle.bin"])
    files["not-state.pth"] = folder / "not-state.pth"
    torch.save([torch.zeros(2)], files["not-state.pth"])
    files["timm-training.pth.tar"] = folder / "model_best.pth.tar"  # as timm's train.py writes it
    torch.save(timm_training_checkpoint(good), files["timm-training.pth.tar"])
    for ext in (".pth", ".safetensors"):  # integer weights would load cast to float, as wrong weights
        ints = {k: v.to(torch.int32) if k == "blocks.0.norm1.weight" else v for k, v in good.state_dict().items()}
        files[f"ints{ext}"] = folder / f"ints{ext}"
        if ext == ".pth":
            torch.save(ints, files[f"ints{ext}"])
        else:
            save_file(ints, files[f"ints{ext}"])
    files["resnet.pth"] = folder / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 7, 7)}, files["resnet.pth"])

    files["bad-metadata.safetensors"] = folder / "bad-metadata.safetensors"
    save_file(good.state_dict(), files["bad-metadata.safetensors"], metadata={"format": "mlpmixer", "config": "{"})
    files["bad-names.safetensors"] = folder / "bad-names.safetensors"
    save_file(good.state_dict(), files["bad-names.safetensors"],
              metadata={"format": "mlpmixer", "config": SQUARE.to_json(), "class_names": '["only one"]'})

    for text in ("hello\n", "abc"):  # the legacy reader fails on these with KeyError and IndexError
        files[f"text-{text.strip()}.pth"] = folder / f"text-{text.strip()}.pth"
        files[f"text-{text.strip()}.pth"].write_text(text)

    for ext, others in ((".npz", (".pth", ".safetensors")), (".pth", (".npz", ".safetensors")),
                        (".safetensors", (".npz", ".bin", ".pth.tar"))):  # good files under another format's name
        for other in others:
            files[f"renamed{ext}{other}"] = folder / f"renamed-{ext[1:]}{other}"
            files[f"renamed{ext}{other}"].write_bytes((folder / f"good{ext}").read_bytes())

    files["missing.npz"] = folder / "does-not-exist.npz"
    files["unknown-extension"] = folder / "weights.h5"
    files["unknown-extension"].write_bytes(b"\x89HDF")
    files["directory"] = folder / "empty-run"
    files["directory"].mkdir()
    return files


EXPECTED = {
    "truncated": "truncated",
    "text-": "not a readable PyTorch file",
    "flipped.safetensors": "is corrupt: its weights do not match the CRC-32 saved with them; re-download or re-save it.",
    "flipped": "(truncated or corrupt: Bad CRC-32 for",
    "random": "corrupt",
    "empty": "corrupt",
    "object-array.npz": "never unpickled",
    "pickle.npz": "is not an .npz archive",
    "npy-as.npz": "is not an .npz archive",
    "ints": "non-float",
    "flat-stem.npz": "not (P, P, in, C)",
    "vit.npz": "not in the official Mixer layout",
    "pickle.pth": "never unpickled",
    "torch-pickle.bin": "never unpickled",
    "timm-training.pth.tar": "is a timm training checkpoint, whose arguments (an argparse.Namespace) are never "
                             "unpickled; if you trust the file, keep only its weights, in Python: torch.save(",
    "not-state.pth": "not a state dict of tensors",
    "resnet.pth": "not an MLP-Mixer checkpoint",
    "bad-metadata.safetensors": "damaged or unknown mlpmixer configuration",
    "bad-names.safetensors": "lists 1 class names for its 5-class head",
    "renamed": "as its extension",
    "missing.npz": "No checkpoint at",
    "unknown-extension": "unknown checkpoint extension '.h5'",
    "directory": "directory without model.safetensors",
}


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return bad_files(tmp_path_factory.mktemp("bad"))


def expected_text(name: str) -> str:
    return next(text for key, text in EXPECTED.items() if name.startswith(key))


def test_every_bad_file_gets_one_clear_sentence(bad: dict[str, Path]) -> None:
    for name, path in bad.items():
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        message = str(err.value)
        assert expected_text(name) in message, (name, message)
        assert str(path) in message, (name, message)
        assert "\n" not in message and message.endswith("."), (name, message)
    assert not (next(iter(bad.values())).parent / "EXECUTED").exists()


def test_unreadable_pytorch_files_are_one_sentence_without_the_readers_noise(bad: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    """torch's zip reader explains a file cut short before its central directory in several sentences, and
    its legacy reader meets a text file with a KeyError whose message is one of its bytes ("101"): neither
    belongs in our sentence."""
    torch.save(random_model(SQUARE).state_dict(), tmp_path / "good.pth")
    cut = tmp_path / "cut.pth"
    cut.write_bytes((tmp_path / "good.pth").read_bytes()[:1000])
    messages = {}
    for name, path in (("cut.pth", cut), *((n, bad[n]) for n in ("text-hello.pth", "text-abc.pth"))):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        messages[name] = str(err.value)
    assert "central directory" in messages["cut.pth"], messages
    assert ". " not in messages["cut.pth"] and "miniz" not in messages["cut.pth"], messages
    for name in ("text-hello.pth", "text-abc.pth"):
        assert "(corrupt or another kind of file)" in messages[name], messages


def test_a_file_named_as_another_format_says_which_it_is(bad: dict[str, Path]) -> None:
    """An .npz, a PyTorch file or a .safetensors file under another format's extension is named for what it is,
    with the extension to give it, not called truncated or corrupt (re-downloading would not help)."""
    kinds = {".npz": ("an official .npz archive", ".npz"), ".pth": ("a PyTorch file", ".pth"),
             ".safetensors": ("a .safetensors file", ".safetensors")}
    named = {".npz": "an official .npz archive", ".pth": "a PyTorch file", ".safetensors": "a .safetensors file",
             ".bin": "a PyTorch file", ".pth.tar": "a PyTorch file"}
    renamed = [name for name in bad if name.startswith("renamed")]
    assert len(renamed) == 7
    for name in renamed:
        ext, other = next((e, name[len("renamed") + len(e):]) for e in kinds if name[len("renamed"):].startswith(e))
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(bad[name])
        what, fix = kinds[ext]
        assert str(err.value) == (f"{bad[name]} is {what}, not {named[other]} as its extension {other!r} says; "
                                  f"rename it to end in {fix}."), name
    for name in ("truncated.npz", "truncated.pth", "truncated.safetensors", "pickle.npz"):  # the readers' words
        with pytest.raises(CheckpointError, match="truncated|corrupt|not an .npz archive"):
            load_checkpoint(bad[name])


def test_a_damaged_npz_array_is_named(tmp_path: Path) -> None:
    """zlib's and NumPy's errors about one member of an .npz ("Error -3 while decompressing data", "EOF: reading
    array data") do not say which array it is; the message does, so the user knows which array is broken."""
    good = save_checkpoint(random_model(SQUARE), tmp_path / "good.npz")
    broken = "MixerBlock_1/token_mixing/Dense_0/kernel"
    with zipfile.ZipFile(good) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}

    def damaged(name: str, compression: int, change: Callable[[bytes], bytes]) -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w", compression) as archive:  # each member's CRC-32 fits its (changed) bytes
            for member, data in members.items():
                archive.writestr(member, change(data) if member == f"{broken}.npy" else data)
        return path

    cut = damaged("cut.npz", zipfile.ZIP_STORED, lambda data: data[:-100])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(cut)
    assert str(err.value) == (f"{cut} is not a readable .npz file (array {broken} truncated or corrupt: EOF: reading "
                              "array data, expected 1024 bytes got 924); re-download or re-save it.")
    # Compressed, as np.savez_compressed writes: the deflate stream of that member broken.
    deflated = damaged("deflated.npz", zipfile.ZIP_DEFLATED, lambda data: data)
    raw = bytearray(deflated.read_bytes())
    with zipfile.ZipFile(deflated) as archive:
        info = archive.getinfo(f"{broken}.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)  # the member's compressed bytes
    raw[start] = 0xFF  # a deflate block of the reserved type 3, which zlib refuses before any CRC check
    deflated.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"array {broken} truncated or corrupt: Error -3 while decompressing"):
        load_checkpoint(deflated)


def test_payload_would_run_if_unpickled(tmp_path: Path) -> None:
    """The proof above means something: unpickling the same payload does create the marker."""
    marker = tmp_path / "EXECUTED"
    pickle.loads(pickle.dumps(payload(marker)))
    assert marker.exists()


def test_bad_files_on_the_command_line(bad: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name, path in bad.items():
        code, out, err = run_cli(["convert", path, tmp_path / "out.safetensors"], capsys)
        assert code != 0, name
        assert err.startswith("mixer convert: error: ") and expected_text(name) in err, (name, err)
        assert "Traceback" not in err and err.count("\n") == 1, (name, err)
        assert not (tmp_path / "out.safetensors").exists()
    assert not (next(iter(bad.values())).parent / "EXECUTED").exists()


def test_read_checkpoint_reports_config_and_names(tmp_path: Path) -> None:
    model = random_model(SQUARE)
    model.class_names = list("abcde")
    save_checkpoint(model, tmp_path / "m.safetensors")
    state, config, extra = read_checkpoint(tmp_path / "m.safetensors", drop_path_rate=0.2)
    assert config == SQUARE.replace(drop_path_rate=0.2)
    assert extra == {"class_names": list("abcde"), "layout": "mlpmixer", "global_pool": "avg"}
    assert state.keys() == model.state_dict().keys()
    for name, layout in (("m.npz", "official"), ("m.pth", "timm")):
        save_checkpoint(model, tmp_path / name)
        assert read_checkpoint(tmp_path / name)[2] == {"layout": layout}  # names do not travel in these
    with pytest.raises(CheckpointError, match="Cannot apply"):
        read_checkpoint(tmp_path / "m.safetensors", heads=3)


@pytest.mark.parametrize("suffix", [".npz", ".pth"])
def test_a_wide_grid_with_a_square_token_count_loads_at_the_models_size(tmp_path: Path, suffix: str) -> None:
    """A 2×8 patch grid has 16 tokens, as a 4×4 one: files without an image size load at the size of the
    model they are loaded into, and alone at the square size (which `save_checkpoint`'s notes warn of)."""
    wide = random_model(SQUARE.replace(img_size=(16, 64)))
    path = tmp_path / f"wide{suffix}"
    save_checkpoint(wide, path)
    into = create_model(SQUARE.replace(img_size=(16, 64), gelu=wide.config.gelu))
    load_checkpoint(path, model=into)
    assert into.config.img_size == (16, 64)
    assert_same_state(into, wide)
    assert load_checkpoint(path).config.img_size == (32, 32)
    assert load_checkpoint(path, img_size=(16, 64)).config.img_size == (16, 64)


def test_info_takes_the_size_of_a_wide_grid_with_a_square_token_count(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """mixer info --img-size 16 64 for a 2×8 grid's 16 tokens was refused ("made for 32×32 images"): the square
    guess came before the size given, which the user had no other way to state."""
    path = save_checkpoint(random_model(SQUARE.replace(img_size=(16, 64))), tmp_path / "wide.npz")
    code, out, err = run_cli(["info", path, "--img-size", "16", "64"], capsys)
    assert code == 0 and "input       16×64, 3 channels; patch 8×8, 16 tokens" in out, err
    assert read_checkpoint(path, img_size_hint=(16, 64))[1].img_size == (16, 64)
    code, out, _ = run_cli(["info", path], capsys)  # alone, the file can only be read as the square grid
    assert code == 0 and "32×32" in out
    code, _, err = run_cli(["info", path, "--img-size", "16", "24"], capsys)  # 6 tokens, not the file's 16
    assert code == 2 and "is made for 32×32 images" in err and "as many patches as the file has tokens" in err


def test_a_file_without_its_size_says_which_commands_take_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = save_checkpoint(random_model(SQUARE.replace(img_size=(16, 24))), tmp_path / "wide.npz")  # a 2×3 grid
    code, _, err = run_cli(["info", path], capsys)
    assert code == 2 and "6 tokens, which do not form a square patch grid" in err and "mixer info and convert" in err
    code, out, _ = run_cli(["info", path, "--img-size", "16", "24"], capsys)
    assert code == 0 and "16×24" in out
    code, _, err = run_cli(["info", path, "--img-size", "20", "20"], capsys)  # 25 tokens, not 6
    assert code == 2 and "6 tokens of 8×8 patches, which form no square grid and which 20×20 images do not give" in err
    with pytest.raises(CheckpointError, match="which 16×16 images do not give.*load_checkpoint.path, img_size="):
        load_checkpoint(path, create_model(SQUARE.replace(img_size=(16, 16))))  # a model takes no img_size


# --- what the formats carry ---------------------------------------------------------------------


def test_saving_to_a_format_that_changes_the_gelu_warns_once(tmp_path: Path) -> None:
    """.pth files reload with exact GELU, .npz with tanh: saving a model of the other GELU says so, from
    save_checkpoint and convert alike, and what it says does keep the GELU."""
    tanh = random_model(SQUARE)  # the official GELU, our default
    _, said = caught(lambda: save_checkpoint(tanh, tmp_path / "t.pth"))
    assert said == [f"{tmp_path / 't.pth'} will load with exact GELU, as timm-format files carry no configuration, "
                    "but this model uses tanh GELU: to keep it, save as .safetensors, or load the file with "
                    "gelu='tanh' (mixer convert --gelu tanh)."]
    assert load_checkpoint(tmp_path / "t.pth").config.gelu == "exact"  # what the warning warns of
    assert load_checkpoint(tmp_path / "t.pth", gelu="tanh").config.gelu == "tanh"
    for name in ("t.npz", "t.safetensors"):  # formats that reload it as tanh: nothing to say
        assert caught(lambda: save_checkpoint(tanh, tmp_path / name))[1] == []
        assert load_checkpoint(tmp_path / name).config.gelu == "tanh"
    _, said = caught(lambda: convert(tmp_path / "t.safetensors", tmp_path / "c.bin"))
    assert len(said) == 1 and "c.bin will load with exact GELU" in said[0]
    exact = random_model(SQUARE.replace(gelu="exact"))
    _, said = caught(lambda: save_checkpoint(exact, tmp_path / "e.npz"))
    assert len(said) == 1 and "will load with tanh GELU" in said[0] and "gelu='exact'" in said[0]
    assert caught(lambda: save_checkpoint(exact, tmp_path / "e.pth"))[1] == []


def test_a_model_loaded_into_keeps_its_gelu(tmp_path: Path) -> None:
    """A foreign file cannot say its GELU: the model it is loaded into keeps its own, and computes what
    the saved model did."""
    tanh = random_model(SQUARE)
    caught(lambda: save_checkpoint(tanh, tmp_path / "t.pth"))
    target = create_model(SQUARE)
    assert caught(lambda: load_checkpoint(tmp_path / "t.pth", model=target))[1] == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert target.config.gelu == "tanh" and torch.equal(target.eval()(x), tanh(x))
    # Our files do say it: a different one is kept too, and warned of.
    exact = random_model(SQUARE.replace(gelu="exact"))
    save_checkpoint(exact, tmp_path / "e.safetensors")
    _, said = caught(lambda: load_checkpoint(tmp_path / "e.safetensors", model=target))
    assert target.config.gelu == "tanh" and len(said) == 1
    assert said[0].startswith(f"{tmp_path / 'e.safetensors'} was saved from a model with exact GELU; the model it "
                              "is loaded into keeps its tanh GELU")


def test_timm_training_checkpoints_say_how_to_keep_their_weights(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """model_best.pth.tar is refused (its argparse.Namespace would need unpickling); the one line it suggests,
    run on a trusted file, gives a file that loads. Without the Namespace, such a file loads as it is."""
    model = random_model(SQUARE.replace(gelu="exact"))
    best = tmp_path / "model_best.pth.tar"
    torch.save(timm_training_checkpoint(model), best)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(best)
    suggested = str(err.value).partition("in Python: ")[2].partition(", and load that")[0]
    monkeypatch.chdir(tmp_path)  # the suggestion writes model.pth in the current folder
    exec(suggested, {"torch": torch})  # noqa: S102 - our own file, trusted
    assert_same_state(model, load_checkpoint(tmp_path / "model.pth"))
    plain = timm_training_checkpoint(model)
    del plain["args"], plain["arch"]  # the Namespace and a string: what weights_only=True reads is left
    torch.save(plain, tmp_path / "plain.pth.tar")
    assert_same_state(model, load_checkpoint(tmp_path / "plain.pth.tar"))


def test_bfloat16_weights_load_as_float32_unless_loaded_into_a_bfloat16_model(tmp_path: Path) -> None:
    """Our .safetensors keeps the dtype it was given; load_checkpoint builds float32 models from every
    format (safe to train; .npz cannot hold bfloat16 anyway), exactly, and fills a given model in its dtype."""
    bf16 = random_model(SQUARE).to(torch.bfloat16)
    path = save_checkpoint(bf16, tmp_path / "bf16.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("stem.proj.weight").dtype == torch.bfloat16  # saved as it was
    back = load_checkpoint(path)
    assert all(t.dtype == torch.float32 for t in back.state_dict().values())
    assert torch.equal(back.stem.proj.weight, bf16.stem.proj.weight.float())
    into = load_checkpoint(path, model=create_model(SQUARE).to(torch.bfloat16))
    assert_same_state(bf16, into)


def test_class_names_that_would_not_load_back_are_refused_when_saving(tmp_path: Path) -> None:
    """Names of the right count that were not strings were written, then refused by the loader as names "that do
    not match its 5-class head"; a string was written as its letters."""
    model = random_model(SQUARE)
    path = tmp_path / "m.safetensors"
    for names, said in ((list(range(5)), "class names are strings, and 0 is of type int"),
                        (["a", "b", None, "d", "e"], "class names are strings, and None is of type NoneType"),
                        ("abcde", "class names are a list of strings, one per class, not 'abcde'")):
        with pytest.raises(CheckpointError) as err:
            save_checkpoint(model, path, class_names=names)
        assert str(err.value) == f"Cannot write {path}: {said}; " + (
            "give them as a list." if isinstance(names, str) else "give each class its name as a string (str(name)).")
        model.class_names = names  # as training sets them
        with pytest.raises(CheckpointError, match=said):
            save_checkpoint(model, path)
        assert not path.exists()
    # Names given twice are said, not refused (a run must not lose its model at the final save); they load back.
    model.class_names = ["a", "b", "a", "c", "c"]
    _, said = caught(lambda: save_checkpoint(model, path))
    assert said == [f"The class names saved to {path} repeat 'a', 'c', so per-class reports and predictions cannot "
                    "tell those classes apart; give each class its own name."]
    assert load_checkpoint(path).class_names == ["a", "b", "a", "c", "c"]
    # A file that holds such names (written before this check) is refused for what is wrong with them.
    save_file(model.state_dict(), tmp_path / "int.safetensors",
              metadata={"format": "mlpmixer", "config": SQUARE.to_json(), "class_names": "[0, 1, 2, 3, 4]"})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "int.safetensors")
    assert str(err.value) == (f"{tmp_path / 'int.safetensors'} lists class names that are not strings (0 is of type "
                              "int); re-save it with this version of mlpmixer with a string per class.")


def test_our_files_keep_a_head_that_sees_every_token(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A model with global_pool "" (per-token logits), or pruned for features, came back pooling by the mean."""
    x = torch.randn(2, 3, 32, 32)
    model = random_model(SQUARE)
    model.global_pool = ""
    save_checkpoint(model, tmp_path / "m.safetensors")
    back = load_checkpoint(tmp_path / "m.safetensors").eval()
    assert back.global_pool == "" and back(x).shape == (2, 16, 5) and torch.allclose(back(x), model(x))
    model.prune_intermediate_layers(1)
    save_checkpoint(model, tmp_path / "pruned.safetensors")
    assert load_checkpoint(tmp_path / "pruned.safetensors")(x).shape == model(x).shape == (2, 16, 32)
    code, out, _ = run_cli(["info", tmp_path / "m.safetensors"], capsys)
    assert code == 0 and "head        5 classes, for each token (no pooling)" in out
    # Files from before, which carry no pooling, pooled by the mean.
    state = random_model(SQUARE).state_dict()
    save_file(state, tmp_path / "old.safetensors", metadata={"format": "mlpmixer", "config": SQUARE.to_json()})
    assert load_checkpoint(tmp_path / "old.safetensors").global_pool == "avg"
    # The foreign formats cannot carry it: said when saving.
    _, said = caught(lambda: save_checkpoint(back, tmp_path / "m.npz"))
    assert any("official .npz files carry no pooling" in s and "global_pool=''" in s for s in said), said


def test_convert_does_not_relabel_the_size_a_file_records(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--img-size 16 64 gives a 4×4 grid's 16 tokens too: convert wrote the file's weights as a 2×8 model, while
    mixer info refused the same size; both now refuse it in the same sentence."""
    path = save_checkpoint(random_model(SQUARE), tmp_path / "m.safetensors")
    said = (f"{path} is made for 32×32 images, not 16×64: an image size given with a checkpoint (img_size=, "
            "--img-size) only names the size of a file that does not record it")
    for command in (["convert", path, tmp_path / "out.pth"], ["info", path]):
        code, out, err = run_cli([*command, "--img-size", "16", "64"], capsys)
        assert code == 2 and out == "" and err.count("\n") == 1 and said in err, err
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("damage", ["missing key", "gap in the blocks", "metadata of other widths"])
def test_info_refuses_a_damaged_file_as_loading_does(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    damage: str) -> None:
    model = random_model(SQUARE)
    state = model.state_dict()
    metadata = {"format": "mlpmixer", "config": SQUARE.to_json()}
    if damage == "missing key":
        del state["blocks.1.norm2.bias"]
    elif damage == "gap in the blocks":  # blocks 0 and 2: three blocks, the middle one missing
        state = {k.replace("blocks.1.", "blocks.2."): v for k, v in state.items()}
        metadata["config"] = SQUARE.replace(num_blocks=3).to_json()
    else:
        metadata["config"] = SQUARE.replace(channels_mlp_dim=128).to_json()
    path = tmp_path / "damaged.safetensors"
    save_file(state, path, metadata=metadata)
    for command in ("info", "convert"):
        code, out, err = run_cli([command, path, *([tmp_path / "out.pth"] if command == "convert" else [])], capsys)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert f"{path} does not hold the tensors of the Mixer(C=32, N=" in err and "it is damaged" in err, err


def test_torch_files_are_the_same_bytes_each_time(tmp_path: Path) -> None:
    """torch.save named the archive's folder after the random temporary file: two saves of one model differed
    (a register_weights sha256 of one did not match the other), and errors named a file the user never saw."""
    model = random_model(SQUARE)
    for ext in (".pth", ".pt", ".bin"):
        a, b = tmp_path / f"a{ext}", tmp_path / f"b{ext}"
        caught(lambda: (save_checkpoint(model, a), save_checkpoint(model, b)))
        assert a.read_bytes() == b.read_bytes()
        assert not any(".tmp" in n for n in zipfile.ZipFile(a).namelist())
