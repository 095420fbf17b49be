"""The fast path (mlpmixer.fast, mlpmixer.kernels) against the plain PyTorch path, on the CPU.

The Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1), in a subprocess so the
interpreter setting cannot leak into other tests (it must be set before triton is imported).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mlpmixer import kernels as K
from mlpmixer.fast import FastMixer, optimize
from mlpmixer.model import create_model

SRC = str(Path(__file__).resolve().parents[1] / "src")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tiny(gelu: str = "tanh", seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = create_model("S/16", img_size=32, num_classes=7, num_blocks=2, hidden_dim=24,
                     tokens_mlp_dim=12, channels_mlp_dim=40, patch_size=8, gelu=gelu, **kw)
    with torch.no_grad():  # the head starts at zero: perturb everything so outputs are informative
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return out


def grad_error(a: dict, b: dict) -> float:
    """Worst per-parameter relative error, floored at 1e-3 of the largest gradient (some, like
    the token-mixing output bias that the next LayerNorm cancels, are pure round-off)."""
    floor = 1e-3 * max(v.norm() for v in b.values())
    return max(((a[n] - b[n]).norm() / b[n].norm().clamp_min(floor)).item() for n in b)


@pytest.mark.parametrize("act", ["tanh", "exact"])
def test_cpu_gelus_match_pytorchs(act):
    """The tanh GELU through the sigmoid on the CPU: PyTorch's function to fp32 rounding."""
    x, g = torch.randn(64, 33) * 4, torch.randn(64, 33)
    ref = torch.nn.functional.gelu(x, approximate="none" if act == "exact" else "tanh")
    assert rel(K.gelu(x, act), ref) <= 1e-6
    assert rel(K.gelu_(x.clone(), act), ref) <= 1e-6
    h, d = K.gelu_fwd_bwd_ref(x, g, act)
    x.requires_grad_(True)
    torch.nn.functional.gelu(x, approximate="none" if act == "exact" else "tanh").backward(g)
    assert rel(h, ref) <= 1e-6 and rel(d, x.grad) <= 1e-6


@pytest.mark.parametrize("gelu", ["tanh", "exact"])
def test_fast_inference_matches_plain_fp32(gelu):
    model = tiny(gelu).eval()
    fast = optimize(model)
    x = torch.randn(3, 3, 32, 32)  # fresh random inputs
    with torch.no_grad():
        assert rel(fast(x), model(x)) <= 1e-5
        feats = fast.forward_features(x)
        assert feats.is_contiguous() and rel(feats, model.forward_features(x)) <= 1e-5
        assert torch.equal(fast.forward_head(feats, pre_logits=True), feats.mean(dim=1))


def test_cpu_bf16_layer_norm_is_the_fp32_one_rounded():
    """On the CPU a bf16 stream goes to PyTorch's LayerNorm as it is (fp32 inside): within one bf16 step of fp32's."""
    r, w, b = (torch.randn(4, 9, 768) * 3 + 1).bfloat16(), torch.randn(768), torch.randn(768)
    exact = torch.nn.functional.layer_norm(r.float(), (768,), w, b, 1e-6)
    out = K.layer_norm_ref(r, None, None, w, b, 1e-6, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and ((out.float() - exact).abs() <= exact.abs() * 2**-7 + 1e-6).all()
    assert K.layer_norm_ref(r, None, None, w, b, 1e-6, torch.float32).dtype == torch.float32


needs_onednn = pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
                                  reason="this PyTorch is built without oneDNN")


def use_onednn(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    """oneDNN's products on or off, whatever this CPU's instruction set, checked afresh."""
    monkeypatch.setitem(K._state, "onednn_off", None if on else "off for this test")
    monkeypatch.setattr(K, "_verified", set())
    if on:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["none", "exact", "tanh"])
def test_onednn_products_match_their_plain_twins(monkeypatch, dtype, act):
    use_onednn(monkeypatch, True)
    x, w, b, r = (torch.randn(*shape).to(dtype) for shape in [(37, 24), (40, 24), (40,), (37, 40)])
    plain_h = K.gelu_(torch.addmm(b, x, w.t()), act)
    plain_out = r + torch.addmm(b, x, w.t())
    out = K.cpu_linear_add_(r.clone(), x, w, b)
    assert rel(K.cpu_linear_act(x, w, b, act), plain_h) <= (1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert rel(out, plain_out) <= (1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert {k[0] for k in K._verified} == {"onednn linear", "onednn linear add"} and K._state["onednn_off"] is None


@needs_onednn
def test_onednn_is_used_on_avx512_only(monkeypatch):
    """Where it was measured faster than MKL (AVX-512); not with AVX2, where it was not."""
    monkeypatch.setitem(K._state, "onednn_off", None)
    x = torch.randn(4, 8)
    for capability, used in [("AVX512", True), ("AVX512_BF16", True), ("AVX2", False), ("DEFAULT", False)]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        assert K.onednn_usable(x) is used and not K.onednn_usable(x.double())


@needs_onednn
def test_a_failing_onednn_product_falls_back_with_one_warning(monkeypatch):
    use_onednn(monkeypatch, True)
    monkeypatch.setattr(K, "_gelu_attr", lambda act: ("no-such-post-op", [], ""))  # oneDNN refuses it
    x, w, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6)
    with pytest.warns(UserWarning, match="oneDNN linear disabled") as said:
        out = K.cpu_linear_act(x, w, b, "exact")
    assert len(said) == 1 and K._state["onednn_off"] and not K.onednn_usable(x)
    assert torch.equal(out, torch.nn.functional.gelu(torch.addmm(b, x, w.t())))


@needs_onednn
def test_packed_weights_follow_the_parameters(monkeypatch):
    """bf16 inference packs each channel-MLP weight for oneDNN once, and again once it changes: never stale."""
    use_onednn(monkeypatch, True)
    model = tiny().eval()
    fast = optimize(model)
    x = torch.randn(2, 3, 32, 32)

    def outputs() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return fast(x), model(x)

    out, ref = outputs()
    assert rel(out, ref) <= 1e-2
    assert any(key[0] == "onednn linear" and key[-1] for key in K._verified)  # the packed product, checked
    w = model.blocks[0].mlp_channels.fc1.weight
    packed = K.packed_weight(w, torch.bfloat16, 32)
    assert packed is K.packed_weight(w, torch.bfloat16, 8)  # kept, for any number of rows
    assert K.packed_weight(w, torch.float32, 32) is None  # fp32 uses the parameters
    model.load_state_dict(tiny(seed=1).state_dict())  # new values, in place: the version counter moves
    new_out, new_ref = outputs()
    assert rel(new_out, new_ref) <= 1e-2 and rel(new_out, out) > 0.1
    assert K.packed_weight(w, torch.bfloat16, 32) is not packed
    with torch.no_grad():
        model.blocks[0].mlp_channels.fc2.weight.mul_(3)
    third_out, third_ref = outputs()
    assert rel(third_out, third_ref) <= 1e-2 and rel(third_out, new_out) > 0.01


@needs_onednn
@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("gelu", ["tanh", "exact"])
def test_cpu_inference_with_and_without_onednn_matches_plain(monkeypatch, onednn, gelu):
    use_onednn(monkeypatch, onednn)
    model = tiny(gelu).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert rel(optimize(model)(x), model(x)) <= 1e-5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert rel(optimize(model)(x), model(x)) <= 2e-2
    assert any(k[0] == "onednn linear add" for k in K._verified) is onednn


@pytest.mark.parametrize("gelu", ["tanh", "exact"])
def test_tokens_first_inference_with_plain_twins_matches_plain(gelu, monkeypatch):
    """The (S, B, C) inference path that CUDA runs, here with the plain twins Triton falls back to."""
    monkeypatch.setattr(K, "interpreting", lambda: True)  # the CPU takes the tokens-first path...
    monkeypatch.setitem(K._state, "disabled_reason", "off for this test")  # ...without Triton
    model = tiny(gelu).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert rel(optimize(model)(x), model(x)) <= 1e-5
        feats = optimize(model).forward_features(x)
        assert feats.is_contiguous() and rel(feats, model.forward_features(x)) <= 1e-5


@pytest.mark.parametrize("onednn", [True, False] if torch.backends.mkldnn.is_available() else [False])
@pytest.mark.parametrize("gelu", ["tanh", "exact"])
def test_fast_training_matches_plain_fp32(gelu, onednn, monkeypatch):
    use_onednn(monkeypatch, onednn)  # the channel MLP's products through oneDNN (AVX-512 CPUs) or PyTorch's
    model = tiny(gelu).train()
    fast = optimize(model)
    x = torch.randn(3, 3, 32, 32)
    ref_out = model(x)
    ref_out.square().sum().backward()
    ref = grads(model)
    out = fast(x)
    out.square().sum().backward()
    assert rel(out, ref_out) <= 1e-5
    assert grad_error(grads(model), ref) <= 1e-4
    feats = fast.forward_features(x)
    assert feats.requires_grad and feats.is_contiguous() and rel(feats, model.forward_features(x)) <= 1e-5
    assert any(k[0] == "onednn linear" for k in K._verified) is onednn


@pytest.mark.parametrize("path", ["cpu", "tokens-first", "training"])
def test_a_float64_model_stays_float64(path, monkeypatch):
    """The LayerNorm's fp32 upcast is for bf16/fp16 streams: a float64 model's fast path loses nothing."""
    def rel64(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    if path == "tokens-first":  # as test_tokens_first_inference_with_plain_twins_matches_plain
        monkeypatch.setattr(K, "interpreting", lambda: True)
        monkeypatch.setitem(K._state, "disabled_reason", "off for this test")
    model = tiny().double().train(path == "training")
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.set_grad_enabled(path == "training"):
        out, ref = optimize(model)(x), model(x)
    assert out.dtype == torch.float64 and rel64(out, ref) <= 1e-12


def test_triton_leaves_float64_to_pytorch(monkeypatch):
    """The Triton kernels compute in fp32."""
    pytest.importorskip("triton")
    monkeypatch.setattr(K, "interpreting", lambda: True)  # as if the kernels could run on CPU tensors
    monkeypatch.setattr(K, "_interpreter_problem", lambda: None)
    assert K.triton_usable(torch.zeros(2)) and not K.triton_usable(torch.zeros(2, dtype=torch.float64))
    assert K._state["disabled_reason"] is None


def test_fast_bf16_autocast_close_to_plain():
    model = tiny().eval()
    fast = optimize(model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = fast(x), model(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert rel(out, ref) <= 1e-2


def test_fast_shares_parameters_and_falls_back_for_dropout():
    model = tiny(drop_path_rate=0.1).eval()
    fast = optimize(model)
    model.train()  # after wrapping: the wrapper follows the model's mode
    assert [id(p) for p in fast.parameters()] == [id(p) for p in model.parameters()]
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="stochastic depth"):
        torch.manual_seed(1)
        out = fast(x)
    torch.manual_seed(1)
    assert torch.equal(out, model(x))  # the plain path itself, same random mask


def test_each_wrapper_warns_of_its_plain_path_at_the_users_line():
    """The warning pointed at a line in fast.py, where Python's once-per-place filter let the first wrapper warn
    and silenced the second's."""
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # once per place, as Python's default filters show warnings
        first, second = optimize(tiny(drop_rate=0.1).train()), optimize(tiny(drop_rate=0.1).train())
        first(x)
        second(x)  # a line of its own: the user's lines are the places the filter tells apart
    said = [w for w in caught if "does not fuse dropout" in str(w.message)]
    assert len(said) == 2 and {w.filename for w in said} == {__file__}, [(w.filename, w.lineno) for w in said]


def test_fast_training_checkpoints_as_the_model_asks(monkeypatch):
    """set_grad_checkpointing (mixer train --fast --grad-checkpointing) was ignored by the fast path."""
    import mlpmixer.fast as fast_mod

    model = tiny().train()
    fast = optimize(model)
    x = torch.randn(3, 3, 32, 32)
    fast(x).square().sum().backward()
    whole = grads(model)
    real, calls = fast_mod.checkpoint, []
    monkeypatch.setattr(fast_mod, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model.set_grad_checkpointing(True)
    fast(x).square().sum().backward()
    assert len(calls) == len(model.blocks) and grad_error(grads(model), whole) <= 1e-6
    with torch.no_grad():
        fast(x)  # nothing to keep for a backward: not checkpointed
    assert len(calls) == len(model.blocks)


def test_a_float64_model_under_bf16_autocast_runs_in_float64():
    """Autocast leaves float64 alone, so the plain path runs such a model in float64; the fast path cast its
    products to bf16 and failed ("expected scalar type Double but found BFloat16")."""
    model = tiny().double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    for training in (False, True):
        model.train(training)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(training):
            out, ref = optimize(model)(x), model(x)
        assert out.dtype == ref.dtype == torch.float64 and rel(out, ref) <= 1e-12


def test_optimize_names_the_class_it_was_given():
    timm = pytest.importorskip("timm")
    with pytest.raises(TypeError, match=r"takes an mlpmixer.model.MlpMixer, not a timm.models.mlp_mixer.MlpMixer; "):
        optimize(timm.create_model("mixer_s32_224", num_classes=2, img_size=64))


def test_fast_rejects_wrong_input_like_the_model():
    fast = optimize(tiny())
    with pytest.raises(ValueError, match="32×32"):
        fast(torch.randn(1, 3, 48, 48))


def test_fast_mixer_has_the_models_timm_api():
    """timm's tools and ours take the wrapper as they take the model it wraps."""
    timm = pytest.importorskip("timm")
    from timm.data import resolve_data_config
    from timm.optim import create_optimizer_v2

    from mlpmixer.data import TensorData
    from mlpmixer.evaluate import evaluate

    model = tiny()
    fast = optimize(model)
    config = resolve_data_config(model=fast)
    assert config == resolve_data_config(model=model)
    assert config["mean"] == config["std"] == (0.5, 0.5, 0.5)  # not timm's ImageNet default
    assert fast.default_cfg == model.pretrained_cfg
    assert (fast.num_classes, fast.num_features, fast.config) == (7, 24, model.config)
    assert fast.get_classifier() is model.head
    assert not hasattr(fast, "no_weight_decay")  # as the model: timm then decays by its own rule
    modules = dict(fast.named_modules())
    assert [modules[info["module"]] for info in fast.feature_info] == list(model.blocks)

    def lr_scales(net: torch.nn.Module) -> dict[int, float]:
        opt = create_optimizer_v2(net, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
        return {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}

    scales = lr_scales(fast)
    assert scales == lr_scales(model) and len(set(scales.values())) == 4  # stem, 2 blocks, norm + head

    data = TensorData(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8), torch.arange(6) % 7, list("abcdefg"))
    assert evaluate(fast, data, batch_size=4) == evaluate(model, data, batch_size=4)


def test_fast_mixer_reset_classifier_resets_the_model_and_the_graphs():
    model = tiny()
    fast = optimize(model)
    fast._graphs["captured with the old head"] = None
    fast.reset_classifier(3)
    assert model.num_classes == fast.num_classes == 3 and not fast._graphs
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight)  # a zero head would hide a stale one
        assert fast(x).shape == (2, 3)
        assert rel(fast(x), model(x)) <= 1e-5


def test_fast_mixer_copies_and_pickles():
    fast = optimize(tiny().eval())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for other in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
            assert isinstance(other, FastMixer) and other.num_classes == 7
            assert torch.equal(other(x), fast(x))


def test_fast_mixer_state_dict_is_the_models(tmp_path):
    """Under the model's names: interchangeable with the plain model's, timm's and load_checkpoint's."""
    from mlpmixer import load_checkpoint

    model = tiny().eval()
    fast = optimize(model)
    assert list(fast.state_dict()) == list(model.state_dict())
    torch.save(fast.state_dict(), tmp_path / "fast.pth")
    loaded = load_checkpoint(tmp_path / "fast.pth", gelu="tanh").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    other = optimize(tiny(seed=1))
    other.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters()))
    other.load_state_dict({"model." + k: v.neg() for k, v in model.state_dict().items()})  # the names it had before
    assert torch.equal(other.model.head.bias, -model.head.bias)

    outer = torch.nn.Sequential(fast)  # inside another module too, both ways
    assert list(outer.state_dict()) == ["0." + k for k in model.state_dict()]
    torch.nn.Sequential(other).load_state_dict(outer.state_dict())
    assert torch.equal(other.model.head.bias, model.head.bias)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        other.load_state_dict({**model.state_dict(), "extra.weight": torch.zeros(1)})


def test_compiled_fast_mixer_runs_the_plain_path(monkeypatch):
    """As documented: torch.compile traces the model's own forward, not the fast path's kernels."""
    model = tiny().eval()

    def not_traced(*args):
        raise AssertionError("the fast path ran under torch.compile")

    monkeypatch.setattr(FastMixer, "_infer", not_traced)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(torch.compile(optimize(model), backend="eager")(x), model(x), rtol=1e-5, atol=1e-6)


def test_torch_func_transforms_run_the_plain_path():
    """grad, jacrev and vmap (per-sample gradients, saliency) failed on the fast path's autograd.Functions, which
    have no functorch rules; inside a transform the wrapper runs the plain model, as under torch.compile."""
    from torch.func import functional_call, grad, vmap

    model = tiny()
    fast = optimize(model)
    x = torch.randn(3, 3, 32, 32)
    params = dict(model.named_parameters())

    def loss(params, module, x):
        return functional_call(module, params, (x,)).square().sum()

    want, got = grad(loss)(params, model, x), grad(loss)(params, fast, x)
    assert all(torch.equal(got[name], want[name]) for name in want)
    assert torch.equal(grad(lambda x: fast(x).sum())(x), grad(lambda x: model(x).sum())(x))
    per_image = vmap(lambda image: fast(image[None])[0])(x)
    torch.testing.assert_close(per_image, model(x), rtol=1e-5, atol=1e-6)


def test_broken_kernel_falls_back_with_one_warning(monkeypatch):
    """A kernel that gives wrong numbers is caught on first use; a crashing one too."""
    monkeypatch.setitem(K._state, "disabled_reason", None)
    monkeypatch.setattr(K, "_verified", set())
    r = torch.randn(3, 2, 8)
    w, b = torch.randn(8), torch.randn(8)
    expected = K.layer_norm_ref(r, None, None, w, b, 1e-6, torch.float32)

    with pytest.warns(UserWarning, match="disagreed"):
        out = K._run_checked("a wrong kernel", ("k",), lambda: expected + 1, lambda: expected.clone())
    assert torch.equal(out, expected)
    assert K._state["disabled_reason"] is not None
    assert not K.triton_usable(r)  # off for the rest of the process

    monkeypatch.setitem(K._state, "disabled_reason", None)

    def crash():
        raise RuntimeError("no GPU")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = K._run_checked("a crashing kernel", ("k2",), crash, lambda: expected.clone())
        K.disable_triton("a second failure")  # warns only once per process
    assert torch.equal(out, expected)
    assert len([w for w in caught if "Triton kernels disabled" in str(w.message)]) == 1


def _backward_calls(zero: bool) -> dict:
    """Arguments of the three backward kernels' wrappers; `zero`: the gradients are exact zeros."""
    g = (lambda *shape: torch.zeros(*shape)) if zero else (lambda *shape: torch.randn(*shape))
    x, w, b = torch.randn(6, 8), torch.randn(8), torch.randn(8)
    _, mean, rstd = torch.native_layer_norm(x, (8,), w, b, 1e-6)
    return {
        "layer_norm_backward": (g(6, 8), x, mean, rstd, w, b, g(6, 8)),
        "column_sums": (g(6, 8),),
        "gelu_fwd_bwd": (torch.randn(6, 8), g(6, 8), "tanh"),
    }


@pytest.mark.parametrize("name", ["layer_norm_backward", "column_sums", "gelu_fwd_bwd"])
def test_a_backward_check_on_zero_gradients_does_not_count(monkeypatch, name):
    """A fresh model's head is zero, so its first training step sends exact zeros through every backward
    kernel: a kernel right only on zeros (here: twice the right gradient) must still be caught on the next use."""
    T = pytest.importorskip("mlpmixer.kernels._triton")
    monkeypatch.setitem(K._state, "disabled_reason", None)
    monkeypatch.setattr(K, "_verified", set())
    monkeypatch.setattr(K, "triton_usable", lambda t: True)
    plain = {"layer_norm_backward": K.layer_norm_backward_ref, "column_sums": lambda t: t.sum(0),
             "gelu_fwd_bwd": K.gelu_fwd_bwd_ref}[name]

    def twice(*args):
        out = plain(*[a[0] if isinstance(a, tuple) else a for a in args])
        return (*out[:-1], out[-1] * 2) if isinstance(out, tuple) else out * 2  # the last gradient wrong

    if name == "layer_norm_backward":  # the Triton launcher takes no bias
        monkeypatch.setattr(T, name, lambda dy, x, mean, rstd, w, res: twice(dy, x, mean, rstd, w, w, res))
    else:
        monkeypatch.setattr(T, name, twice)
    fused = getattr(K, name)
    fused(*_backward_calls(zero=True)[name])  # the first step of a fresh model: zeros on both sides
    assert K._state["disabled_reason"] is None
    args = _backward_calls(zero=False)[name]
    with pytest.warns(UserWarning, match="disagreed"):
        out = fused(*args)
    ref = plain(*args)
    for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        assert torch.equal(o, r)


@pytest.mark.parametrize("triton_version, numpy_version, message", [
    ("3.0.0", "2.0.2", "Triton 3.0.0 loses its stores under NumPy 2.0.2; install numpy<2.0 or Triton >= 3.2"),
    ("3.2.0", "2.4.6", "Triton 3.2.0 fails on loops under NumPy 2.4.6; install numpy<2.4 or Triton >= 3.7"),
    ("3.2.0", "2.3.5", None),
    ("3.1.0", "1.26.4", None),
    ("3.7.0", "2.4.6", None),
])
def test_interpreter_known_to_fail_is_not_used(monkeypatch, triton_version, numpy_version, message):
    """Pairs of Triton and NumPy whose interpreter is broken: the kernels are turned off, saying why."""
    triton = pytest.importorskip("triton")
    import numpy

    # Not TRITON_INTERPRET itself: it would turn the kernels into interpreted ones for this whole process.
    monkeypatch.setattr(K, "interpreting", lambda: True)
    monkeypatch.setitem(K._state, "disabled_reason", None)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    monkeypatch.setattr(triton, "__version__", triton_version)
    if message is None:
        assert K.triton_usable(torch.zeros(1))
    else:
        with pytest.warns(UserWarning, match=re.escape(message)):
            assert not K.triton_usable(torch.zeros(1))


# --- Triton kernels in the CPU interpreter ------------------------------------------------------

INTERPRETER_CHECKS = r"""
import json, torch
from mlpmixer import kernels as K
from mlpmixer.fast import FastMixer, optimize
from mlpmixer.model import create_model
torch.manual_seed(0)
rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
res = {}
S, B, C = 5, 3, 20
r = torch.randn(S, B, C)
rb, cb, w, b = torch.randn(S), torch.randn(C), torch.randn(C), torch.randn(C)
from mlpmixer.kernels import _triton as T
for name, args in {"ln": (rb, cb), "ln_row": (rb, None), "ln_none": (None, None)}.items():
    res[name] = rel(T.layer_norm(r, *args, w, b, 1e-6, torch.float32), K.layer_norm_ref(r, *args, w, b, 1e-6, torch.float32))
res["ln_bf16_out"] = rel(T.layer_norm(r, rb, cb, w, b, 1e-6, torch.bfloat16), K.layer_norm_ref(r, rb, cb, w, b, 1e-6, torch.float32))
for act in ("none", "exact", "tanh"):
    a, m = torch.randn(21, 18), torch.randn(18, 35)
    bias_c, bias_r = torch.randn(35), torch.randn(21)
    res[f"mm_cols_{act}"] = rel(T.linear_act(a, m, bias_c, False, act), K.linear_act_ref(a, m, bias_c, False, act))
    res[f"mm_rows_{act}"] = rel(T.linear_act(a, m, bias_r, True, act), K.linear_act_ref(a, m, bias_r, True, act))
    wt = torch.randn(35, 18)  # a transposed view, as the channel MLP passes W3ᵀ
    res[f"mm_transposed_{act}"] = rel(T.linear_act(a, wt.t(), bias_c, False, act), K.linear_act_ref(a, wt.t(), bias_c, False, act))
for act in ("exact", "tanh"):
    pre, g = torch.randn(7, 33) * 3, torch.randn(7, 33)
    h, d = T.gelu_fwd_bwd(pre, g, act)
    hr, dr = K.gelu_fwd_bwd_ref(pre, g, act)
    res[f"gelu_h_{act}"], res[f"gelu_d_{act}"] = rel(h, hr), rel(d, dr)
# Training's LayerNorm and its backward, in fp32 and on a stream of bf16 (odd widths: masked columns;
# 37 rows: a last block of rows part-filled), against PyTorch's kernels.
for dtype in ("float32", "bfloat16"):
    dt = getattr(torch, dtype)
    for shape in ((5, 3, 20), (37, 130)):
        c = shape[-1]
        x, w, b = (torch.randn(*shape) * 2 + 0.5).to(dt), torch.randn(c).to(dt), torch.randn(c).to(dt)
        dy, resid = torch.randn(*shape).to(dt), torch.randn(*shape).to(dt)
        y, mean, rstd = T.layer_norm_train(x, w, b, 1e-6, None, None, K._stats_dtype(x))
        y_again = T.layer_norm_train(x, w, b, 1e-6, mean, rstd, K._stats_dtype(x))[0]
        ref = torch.native_layer_norm(x, (c,), w, b, 1e-6)
        got_bwd = T.layer_norm_backward(dy, x, mean, rstd, w, resid)
        ref_bwd = K.layer_norm_backward_ref(dy, x, ref[1], ref[2], w, b, resid)
        res[f"ln_train_{dtype}_{c}"] = max(rel(y, ref[0]), rel(mean, ref[1]), rel(rstd, ref[2]), rel(y_again, ref[0]))
        res[f"ln_backward_{dtype}_{c}"] = max(rel(g, r) for g, r in zip(got_bwd, ref_bwd))
for shape in ((37, 20), (70, 300)):  # one block of columns and two, part-filled
    t = torch.randn(*shape)
    res[f"column_sums_{shape[1]}"] = rel(T.column_sums(t), t.sum(0))
    res[f"column_sums_{shape[1]}_bf16"] = rel(T.column_sums(t.bfloat16()), t.sum(0))
# The whole fast path with the Triton kernels (CPU tensors are allowed under the interpreter).
for gelu in ("tanh", "exact"):
    torch.manual_seed(1)
    m = create_model("S/16", img_size=16, num_classes=5, num_blocks=2, hidden_dim=16, tokens_mlp_dim=8,
                     channels_mlp_dim=24, patch_size=8, gelu=gelu)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    f = optimize(m, gemm="triton")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        res[f"model_infer_{gelu}"] = rel(f(x), m(x))
        res[f"model_features_{gelu}"] = rel(f.forward_features(x), m.forward_features(x))
    m(x).square().sum().backward()
    ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    f(x).square().sum().backward()
    got = [p.grad.clone() for p in m.parameters()]
    res[f"model_grads_{gelu}"] = rel(torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in ref]))
res["verified"] = sorted(k[0] for k in K._verified)
res["disabled"] = K._state["disabled_reason"]
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=SRC)
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_CHECKS], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_interpreter_ran_every_kernel_without_fallback(interpreter_results):
    assert interpreter_results["disabled"] is None
    assert set(interpreter_results["verified"]) == {"layer_norm", "linear_act", "gelu_fwd_bwd", "layer_norm_train",
                                                    "layer_norm_backward", "column_sums"}


@pytest.mark.parametrize("name", ["ln", "ln_row", "ln_none"])
def test_triton_layer_norm(interpreter_results, name):
    assert interpreter_results[name] <= 1e-6


def test_triton_layer_norm_bf16_output(interpreter_results):
    assert interpreter_results["ln_bf16_out"] <= 1e-2


@pytest.mark.parametrize("c", [20, 130])
@pytest.mark.parametrize("part", ["train", "backward"])
def test_triton_layer_norm_in_training(interpreter_results, part, c):
    assert interpreter_results[f"ln_{part}_float32_{c}"] <= 1e-6
    # bf16 rounding of the outputs (and on the CPU, PyTorch's bf16 statistics) on both sides
    assert interpreter_results[f"ln_{part}_bfloat16_{c}"] <= 1e-2


@pytest.mark.parametrize("c", [20, 300])
def test_triton_column_sums(interpreter_results, c):
    assert interpreter_results[f"column_sums_{c}"] <= 1e-6
    assert interpreter_results[f"column_sums_{c}_bf16"] <= 1e-2  # the bf16 input and result


@pytest.mark.parametrize("layout", ["cols", "rows", "transposed"])
@pytest.mark.parametrize("act", ["none", "exact", "tanh"])
def test_triton_linear_act(interpreter_results, layout, act):
    assert interpreter_results[f"mm_{layout}_{act}"] <= 1e-6


@pytest.mark.parametrize("act", ["exact", "tanh"])
def test_triton_gelu_fwd_bwd(interpreter_results, act):
    assert interpreter_results[f"gelu_h_{act}"] <= 1e-6
    assert interpreter_results[f"gelu_d_{act}"] <= 1e-6


@pytest.mark.parametrize("gelu", ["tanh", "exact"])
def test_triton_fast_path_whole_model(interpreter_results, gelu):
    assert interpreter_results[f"model_infer_{gelu}"] <= 1e-5
    assert interpreter_results[f"model_features_{gelu}"] <= 1e-5
    assert interpreter_results[f"model_grads_{gelu}"] <= 1e-5


# The interpreter runs kernels as Python and so accepts code the GPU compiler rejects (a plain
# float global inside a kernel did exactly that). Compiling for real GPU targets, which needs no GPU,
# catches such errors here rather than on a GPU machine.
def _signature(kernel, pointers: dict[str, str], scalars: dict[str, str], constants: dict) -> dict[str, str]:
    """Triton's type string for each of the kernel's arguments."""
    return {name: "constexpr" if name in constants else pointers.get(name) or scalars[name]
            for name in kernel.arg_names}


def _kernel_builds() -> list:
    T = pytest.importorskip("mlpmixer.kernels._triton")
    ln_ptrs = dict(R="*bf16", ROW_BIAS="*fp32", COL_BIAS="*fp32", W="*fp32", BIAS="*fp32", Y="*bf16")
    mm_scalars = {n: "i32" for n in ("M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn",
                                     "stride_cm", "stride_cn")}
    builds = [("layer_norm", T._layer_norm_kernel, ln_ptrs, dict(C="i32", B="i32", eps="fp32"),
               dict(HAS_ROW=True, HAS_COL=True, BLOCK_C=1024))]
    for given in (False, True):
        builds.append((f"layer_norm_train stats_given={given}", T._layer_norm_train_kernel,
                       dict(X="*bf16", W="*bf16", BIAS="*bf16", Y="*bf16", MEAN="*fp32", RSTD="*fp32"),
                       dict(rows="i32", C="i32", eps="fp32"), dict(STATS_GIVEN=given, BLOCK_R=16, BLOCK_C=128)))
    for block_r, block_c in ((16, 128), (1, 2048)):  # Mixer-nano's rows, H/14's (1,280 channels)
        builds.append((f"layer_norm_backward {block_r}x{block_c}", T._layer_norm_backward_kernel,
                       dict(DY="*bf16", X="*bf16", MEAN="*fp32", RSTD="*fp32", W="*bf16", RES="*bf16", DX="*bf16",
                            DW_PART="*fp32", DB_PART="*fp32"),
                       dict(rows="i32", C="i32", rows_per_program="i32"), dict(BLOCK_R=block_r, BLOCK_C=block_c)))
    builds.append(("column_sums", T._column_sums_kernel, dict(T="*bf16", PART="*fp32"),
                   dict(rows="i32", C="i32", rows_per_program="i32"), dict(BLOCK_R=8, BLOCK_C=256)))
    for act in (1, 2):  # exact, tanh GELU
        builds.append((f"gelu_fwd_bwd act={act}", T._gelu_fwd_bwd_kernel,
                       dict(PRE="*bf16", GRAD="*bf16", H="*bf16", DPRE="*bf16"), dict(n="i32"),
                       dict(ACT=act, BLOCK=1024)))
    for act, dtype in ((1, "fp32"), (2, "bf16")):  # both GELUs, both product precisions
        ptrs = {n: f"*{dtype}" for n in ("A", "Bm", "BIAS", "Cm")}
        builds.append((f"linear_act {dtype} act={act}", T._linear_act_kernel, ptrs, mm_scalars,
                       dict(BIAS_ON_ROWS=act == 1, ACT=act, IEEE=dtype == "fp32", BLOCK_M=128, BLOCK_N=128,
                            BLOCK_K=64, GROUP_M=8)))
    return builds


@pytest.mark.parametrize("arch", [90, 80])  # Hopper and Ampere; only the products differ between them
def test_triton_kernels_compile_for_gpus(arch):
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for name, kernel, pointers, scalars, constants in _kernel_builds():
        if arch != 90 and not name.startswith("linear_act"):
            continue
        sig = _signature(kernel, pointers, scalars, constants)
        compiled = triton.compile(ASTSource(kernel, sig, constants), target=GPUTarget("cuda", arch, 32))
        assert compiled.asm.get("cubin"), f"{name}: no GPU code for sm_{arch}"


def test_a_model_pruned_of_its_norm_runs_on_the_plain_path():
    """The fast path fuses the final LayerNorm; prune_intermediate_layers(prune_norm=True) removes it."""
    model = create_model("digits/4", num_classes=10).eval()
    model.prune_intermediate_layers(2, prune_norm=True)
    x = torch.randn(3, *model.config.img_size).unsqueeze(1).expand(3, model.config.in_chans, -1, -1).contiguous()
    with torch.no_grad():
        assert torch.equal(optimize(model)(x), model(x))
