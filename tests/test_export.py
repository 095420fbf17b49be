"""`mixer export`: ONNX (checked with onnxruntime), TorchScript and ExportedProgram, dynamic batch."""

from __future__ import annotations


import pytest
import torch

from mlpmixer.checkpoints import save_checkpoint
from mlpmixer.cli import build_parser
from mlpmixer.export import ExportError, export_model, load_exported
from mlpmixer.model import create_model


def small(img_size: int, patch: int, gelu: str = "tanh"):
    torch.manual_seed(0)
    m = create_model("S/16", img_size=img_size, patch_size=patch, num_classes=11, num_blocks=2, hidden_dim=32,
                     tokens_mlp_dim=16, channels_mlp_dim=64, gelu=gelu)
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
    run = load_exported(export_model(model, "onnx", tmp_path / "m.onnx"), "onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # one file: no weights beside it
    for batch in (1, 5):  # traced with batch 2: the batch axis is dynamic
        x = torch.randn(batch, 3, img_size, img_size)
        with torch.no_grad():
            ref = model(x)
        got = run(x)
        assert got.shape == (batch, 11)
        assert rel(got, ref) <= 1e-4


@pytest.mark.parametrize("fmt, name", [("torchscript", "m.pt"), ("exported-program", "m.pt2")])
def test_torch_formats_match_at_any_batch(tmp_path, fmt, name):
    model = small(48, 8)
    run = load_exported(export_model(model, fmt, tmp_path / name), fmt)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 48, 48)
        with torch.no_grad():
            assert rel(run(x), model(x)) <= 1e-5


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
