"""`mixer export`: ONNX (checked with onnxruntime), TorchScript and ExportedProgram, dynamic batch."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mlpmixer.checkpoints import save_checkpoint
from mlpmixer.cli import build_parser
from mlpmixer.export import ExportError, export_model, load_exported
from mlpmixer.model import create_model
from mlpmixer.permute import FixedPermutation


def small(img_size: int | tuple[int, int], patch: int, gelu: str = "tanh", in_chans: int = 3, num_classes: int = 11):
    torch.manual_seed(0)
    m = create_model("S/16", img_size=img_size, patch_size=patch, num_classes=num_classes, num_blocks=2,
                     hidden_dim=32, tokens_mlp_dim=16, channels_mlp_dim=64, gelu=gelu, in_chans=in_chans)
    with torch.no_grad():  # the zero head would make every logit 0: perturb all parameters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("img_size, patch, gelu", [(224, 16, "tanh"), (48, 8, "exact")])
def test_onnx_matches_pytorch_at_any_batch(tmp_path, img_size, patch, gelu):
    pytest.importorskip("onnxruntime")
    model = small(img_size, patch, gelu)
    run = load_exported(export_model(model, "onnx", tmp_path / "m.onnx").path, "onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # one file: no weights beside it
    for batch in (1, 3, 17):  # traced with batch 2: the batch axis is dynamic
        x = torch.randn(batch, 3, img_size, img_size)
        with torch.no_grad():
            ref = model(x)
        got = run(x)
        assert got.shape == (batch, 11)
        assert rel(got, ref) <= 1e-4


@pytest.mark.parametrize("fmt, name", [("torchscript", "m.pt"), ("exported-program", "m.pt2")])
@pytest.mark.parametrize("img_size, in_chans, num_classes", [(48, 3, 11), ((32, 64), 1, 11), (32, 3, 0)])
def test_torch_formats_match_at_any_batch(tmp_path, fmt, name, img_size, in_chans, num_classes):
    model = small(img_size, 8, in_chans=in_chans, num_classes=num_classes)  # rectangular, 1-channel, headless
    run = load_exported(export_model(model, fmt, tmp_path / name).path, fmt)
    for batch in (1, 3, 17):
        x = torch.randn(batch, in_chans, *model.config.img_size)
        with torch.no_grad():
            ref = model(x)
        assert run(x).shape == ref.shape == (batch, num_classes or 32)
        assert rel(run(x), ref) <= 1e-5


def test_export_leaves_the_model_usable(tmp_path):
    model = small(48, 8).train().bfloat16()
    export_model(model, "torchscript", tmp_path / "m.pt")
    assert model.training and model.head.weight.dtype == torch.bfloat16  # exported from a copy
    model.float()
    x = torch.randn(2, 3, 48, 48)
    with pytest.raises(ValueError, match="48×48"):  # the input check still works after tracing
        model(torch.randn(2, 3, 32, 32))
    assert model(x).shape == (2, 11)


def test_export_rejects_bad_requests(tmp_path):
    model = small(48, 8)
    with pytest.raises(ExportError, match="Unknown export format 'tflite'"):
        export_model(model, "tflite", tmp_path / "m.tflite")
    with pytest.raises(ExportError, match="m.pt2 instead of m.bin"):
        export_model(model, "exported-program", tmp_path / "m.bin")


def test_export_command_writes_and_checks_the_file(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    ckpt = save_checkpoint(small(48, 8), tmp_path / "model.safetensors")
    args = build_parser(["export"]).parse_args(["export", str(ckpt), "--format", "onnx"])
    assert args.func(args) == 0
    assert (tmp_path / "model.onnx").stat().st_size > 0  # default: next to the checkpoint
    (tmp_path / "model.onnx").unlink()
    args = build_parser(["export"]).parse_args(["export", str(tmp_path), "--format", "onnx"])  # a run directory
    assert args.func(args) == 0 and (tmp_path / "model.onnx").is_file()  # inside it
    captured = capsys.readouterr()
    assert "any batch" in captured.out and "relative error against PyTorch" in captured.out
    assert captured.err == ""  # torch's recommended exporter for its version: no deprecation notice, no chatter


@pytest.mark.parametrize("zero_head", [True, False])
def test_export_check_says_when_a_zero_head_leaves_nothing_to_compare(tmp_path, recwarn, zero_head):
    model = small(48, 8)
    if zero_head:
        model.reset_classifier(11)  # a new head: every logit is its bias, whatever the image
    ckpt = save_checkpoint(model, tmp_path / "model.safetensors")
    args = build_parser(["export"]).parse_args(["export", str(ckpt), "--format", "torchscript"])
    assert args.func(args) == 0
    said = [str(w.message) for w in recwarn if "do not depend on the image" in str(w.message)]
    assert len(said) == int(zero_head)


def test_export_command_refuses_what_would_lose_or_mislabel_a_file(tmp_path, capsys):
    from mlpmixer.cli import main
    from mlpmixer.checkpoints import load_checkpoint

    ckpt = save_checkpoint(small(48, 8), tmp_path / "model.safetensors")
    before = ckpt.read_bytes()
    for argv, said in (
        (["--format", "torchscript", "--out", str(ckpt)], "is the checkpoint being read"),
        (["--format", "onnx", "--out", str(tmp_path / "m.pt")], "An onnx file is named .onnx: name it m.onnx"),
        (["--format", "torchscript", "--out", str(tmp_path)], "is a folder; give the name of a file"),
        (["--format", "onnx", "--opset", "99"], "ONNX opset 99 is not one the installed onnx package knows"),
        (["--format", "onnx", "--opset", "0"], "ONNX opset 0 is not one the installed onnx package knows"),
        (["--format", "torchscript", "--opset", "17"], "--opset sets the ONNX opset; a torchscript file has none"),
        (["--format", "torchscript", "--permute-seed", "3"], "--permute-seed needs --permute"),
        (["--format", "torchscript", "--permute", "pixels", "--permute-seed", str(2 ** 64)],
         "--permute-seed must be a whole number from 0 to 9,223,372,036,854,775,807"),
        (["--format", "torchscript", "--permute", "pixels", "--permute-seed", "-1"], "--permute-seed must be"),
    ):
        assert main(["export", str(ckpt), *argv]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
    assert ckpt.read_bytes() == before and not (tmp_path / "model.onnx").exists()
    assert main(["export", str(ckpt), "--format", "torchscript"]) == 0
    with pytest.raises(ValueError, match="is a TorchScript program .* not a checkpoint"):
        load_checkpoint(tmp_path / "model.pt")
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(ValueError, match="is an exported model"):
        load_checkpoint(tmp_path / "model.onnx")
    # A .pt checkpoint as TorchScript: the default --out is the checkpoint itself ("write the new one to another
    # file", though no file was named).
    state = tmp_path / "state.pt"
    torch.save(small(48, 8).state_dict(), state)
    assert main(["export", str(state), "--format", "torchscript"]) == 2
    assert (f"The default --out of a torchscript export of {state} is {state}, the checkpoint itself; give --out."
            in capsys.readouterr().err)


def test_class_names_go_into_every_format(tmp_path, capsys):
    """An exported file carried no class names: a deployed model's outputs could not be read as classes."""
    import json

    import onnxruntime

    from mlpmixer.cli import main
    from mlpmixer.export import CLASS_NAMES_KEY

    model = small(16, 8, num_classes=3)
    model.class_names = ["ant", "bee", "cat"]
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors")
    for fmt, out in (("onnx", "m.onnx"), ("torchscript", "m.pt"), ("exported-program", "m.pt2")):
        assert main(["export", str(ckpt), "--format", fmt, "--out", str(tmp_path / out)]) == 0
        assert f"its class names are in the file as {CLASS_NAMES_KEY}" in capsys.readouterr().out
    meta = onnxruntime.InferenceSession(str(tmp_path / "m.onnx")).get_modelmeta().custom_metadata_map
    extra_ts, extra_ep = {CLASS_NAMES_KEY: ""}, {CLASS_NAMES_KEY: ""}
    torch.jit.load(tmp_path / "m.pt", _extra_files=extra_ts)
    torch.export.load(tmp_path / "m.pt2", extra_files=extra_ep)
    for found in (meta[CLASS_NAMES_KEY], extra_ts[CLASS_NAMES_KEY], extra_ep[CLASS_NAMES_KEY]):
        assert json.loads(found) == ["ant", "bee", "cat"]


def test_a_permuted_run_exports_with_its_permutation_built_in(tmp_path, capsys):
    from mlpmixer.cli import main

    model = small(48, 8)
    save_checkpoint(model, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"recipe": {"permute": "pixels", "permute_seed": 3}}))
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        permuted, plain = model(FixedPermutation("pixels", 48, 8, seed=3)(x)), model(x)
    assert rel(plain, permuted) > 0.01  # the permutation changes the logits, so the check below can fail
    assert main(["export", str(tmp_path), "--format", "torchscript"]) == 0
    assert "permutation (pixels, seed 3) is built in" in capsys.readouterr().out
    assert rel(load_exported(tmp_path / "model.pt", "torchscript")(x), permuted) <= 1e-5  # takes images as they are
    # --permute none: a file for images the caller permutes (or a run that should not have recorded one).
    assert main(["export", str(tmp_path), "--format", "torchscript", "--permute", "none"]) == 0
    assert rel(load_exported(tmp_path / "model.pt", "torchscript")(x), plain) <= 1e-5
    # At another size the permutation would be another one, which the model never saw.
    assert main(["export", str(tmp_path), "--format", "torchscript", "--img-size", "96"]) == 2
    assert "permutation made for 48×48; export it at that size" in capsys.readouterr().err


def test_a_file_that_fails_the_check_is_not_written_and_the_old_one_stays(tmp_path, monkeypatch):
    import mlpmixer.export as export

    def another_model(model, x, path, opset, names):  # a broken exporter: the file holds other weights
        other = small(48, 8).eval()
        with torch.no_grad():
            other.head.bias.add_(1.0)
        torch.jit.save(torch.jit.trace(other, (x,), check_trace=False), path)

    monkeypatch.setattr(export, "_torchscript", another_model)
    (tmp_path / "m.pt").write_bytes(b"the file a deployment uses")
    with pytest.raises(ExportError, match="differ from PyTorch's by .* nothing was written"):
        export_model(small(48, 8), "torchscript", tmp_path / "m.pt")
    assert (tmp_path / "m.pt").read_bytes() == b"the file a deployment uses"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left either


@pytest.mark.parametrize("module", ["onnx", "onnxruntime", "onnxscript"])
def test_a_missing_onnx_package_is_named_before_exporting(tmp_path, monkeypatch, module):
    import importlib

    import mlpmixer.export as export

    if module == "onnxscript" and not export._uses_torch_export_exporter():
        pytest.skip("torch's TorchScript-based ONNX exporter needs no onnxscript")
    real_import = importlib.import_module

    def without(name, *args, **kwargs):
        if name == module:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(export.importlib, "import_module", without)
    monkeypatch.setattr(export, "_onnx", lambda *a: pytest.fail("exported before saying what is missing"))
    with pytest.raises(ExportError, match=f"need the {module} package; install it with pip install"):
        export_model(small(48, 8), "onnx", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_an_onnx_opset_the_exporter_does_not_write_is_refused(tmp_path, capfd):
    pytest.importorskip("onnxruntime")
    import mlpmixer.export as export

    if not export._uses_torch_export_exporter():
        pytest.skip("torch's TorchScript-based ONNX exporter writes opset 13 as asked")
    (tmp_path / "m.onnx").write_bytes(b"old")
    # It cannot convert a Mixer below its own opset 18 (ReduceMean's axes) and kept 18 without an error.
    with pytest.raises(ExportError, match="wrote opset 18 instead of 13.* use the default, 18"):
        export_model(small(32, 16), "onnx", tmp_path / "m.onnx", opset=13)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"] and (tmp_path / "m.onnx").read_bytes() == b"old"
    said = capfd.readouterr().err  # the error says it all: not the exporter's and converter's warnings and traceback
    assert "Traceback" not in said and "opset" not in said


def test_an_export_removes_what_a_killed_export_of_its_file_left(tmp_path):
    stale = tmp_path / ".m.pt.0123456789ab.tmp.pt"  # atomic_write's temporary, never renamed
    others = [tmp_path / ".n.pt.0123456789ab.tmp.pt", tmp_path / ".m.pt.notes.tmp.pt"]  # another file's, not one
    for p in (stale, *others):
        p.write_bytes(b"half written")
    export_model(small(32, 16), "torchscript", tmp_path / "m.pt")
    assert not stale.exists() and all(p.exists() for p in others) and (tmp_path / "m.pt").is_file()


def test_an_unwritable_folder_is_one_sentence(tmp_path, monkeypatch):
    real_open = os.open

    def refuse_new_files(path, flags, *args):  # as a folder without write permission does (tests may run as root)
        if flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_new_files)
    with pytest.raises(ExportError, match=f"Cannot write to {tmp_path}: permission denied; choose another output"):
        export_model(small(48, 8), "torchscript", tmp_path / "m.pt")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux's /proc, where no file can be created")
def test_an_out_where_no_file_can_be_created_is_one_sentence(tmp_path, capsys):
    """Root passes os.access there; the export's temporary file then failed with a raw errno."""
    from mlpmixer.cli import main

    ckpt = save_checkpoint(small(48, 8), tmp_path / "model.safetensors")
    for out in ("/proc/x.pt", "/proc/no/such/x.pt"):
        assert main(["export", str(ckpt), "--format", "torchscript", "--out", out]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mixer export: error: --out {out}: ") and err.count("\n") == 1, err
        assert err.rstrip().endswith("give another --out.") and "Errno" not in err
    (tmp_path / "f").write_text("")  # a file where --out needs a folder: the fix named is another --out
    assert main(["export", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "f" / "x.pt")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"lies under {tmp_path / 'f'}, which is a file; give another --out.")


def test_export_at_another_size_converts_the_model_as_resize_does(tmp_path, capsys):
    from mlpmixer.cli import main
    from mlpmixer.resize import resize_to

    model = small(48, 8)
    ckpt = save_checkpoint(model, tmp_path / "model.safetensors")
    assert main(["export", str(ckpt), "--format", "torchscript", "--img-size", "96"]) == 0
    assert "input: batch×3×96×96" in capsys.readouterr().out
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert rel(load_exported(tmp_path / "model.pt", "torchscript")(x), resize_to(model, 96).eval()(x)) < 1e-5
    for argv, said in ((["--method", "resample"], "--method says how --img-size converts the model"),
                       (["--img-size", "72"], "resample")):  # 72/48 is no whole factor for the paper's method
        assert main(["export", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "x.pt"), *argv]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.pt").exists()
    assert main(["export", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "x.pt"), "--img-size", "72",
                 "--method", "resample"]) == 0
