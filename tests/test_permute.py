"""The fixed pixel permutations of the paper's Figure 4 experiment."""

from __future__ import annotations

import pytest
import torch

from mlpmixer.permute import FixedPermutation


def position_image(h: int, w: int) -> torch.Tensor:
    """A (3, H, W) image whose every pixel holds its own flat position (same in all channels)."""
    return torch.arange(h * w, dtype=torch.float64).reshape(1, h, w).repeat(3, 1, 1)


@pytest.mark.parametrize("mode", ["patches", "pixels"])
def test_fixed_bijection(mode):
    perm = FixedPermutation(mode, (8, 12), patch_size=4, seed=5)
    assert sorted(perm.index.tolist()) == list(range(96))
    assert not torch.equal(perm.index, torch.arange(96))
    x = position_image(8, 12)
    out = perm(x)
    assert sorted(out[0].flatten().tolist()) == list(range(96))  # nothing lost or duplicated
    assert torch.equal(out[1], out[0]) and torch.equal(out[2], out[0])  # channels move together
    # Fixed: the same on every call and for every instance with the same seed, different for another.
    assert torch.equal(perm(x), out)
    assert torch.equal(FixedPermutation(mode, (8, 12), 4, seed=5)(x), out)
    assert not torch.equal(FixedPermutation(mode, (8, 12), 4, seed=6)(x), out)
    # Batches get each image's own result.
    batch = torch.randn(4, 3, 8, 12)
    assert torch.equal(perm(batch), torch.stack([perm(b) for b in batch]))
    # And it can be undone.
    inverse = torch.argsort(perm.index)
    assert torch.equal(out.flatten(-2)[..., inverse].reshape(x.shape), x)


def test_patches_mode_keeps_each_patch_together():
    p = 4
    perm = FixedPermutation("patches", (8, 12), patch_size=p, seed=1)
    x = position_image(8, 12)[0]
    out = perm(x[None])[0]

    def patches(img):
        return img.reshape(2, p, 3, p).permute(0, 2, 1, 3).reshape(6, p * p)

    src, dst = patches(x), patches(out)
    src_sets = [set(row.tolist()) for row in src]
    orders = set()
    for row in dst:
        assert set(row.tolist()) in src_sets  # each output patch is exactly one input patch
        source = src[[set(r.tolist()) for r in src].index(set(row.tolist()))]
        orders.add(tuple(int((source == v).nonzero()) for v in row))
    assert len(orders) == 1  # one shared within-patch pixel permutation
    assert sorted(len(s) for s in orders) == [p * p]
    # "pixels" mode does mix pixels across patches.
    mixed = patches(FixedPermutation("pixels", (8, 12), seed=1)(x[None])[0])
    assert any(set(row.tolist()) not in src_sets for row in mixed)


def test_bad_input():
    with pytest.raises(ValueError, match="mode"):
        FixedPermutation("rows", 8)
    with pytest.raises(ValueError, match="multiple of the 3×3 patch"):
        FixedPermutation("patches", 8, patch_size=3)
    with pytest.raises(ValueError, match="8×8"):
        FixedPermutation("pixels", 8)(torch.zeros(3, 8, 9))


def test_mixer_with_permuted_weights_sees_shuffled_patches_exactly():
    """What makes a Mixer indifferent to "patches" mode: permuting the stem kernels' pixels and the
    token MLPs' tokens gives a Mixer whose outputs on shuffled images equal the original's."""
    from mlpmixer import create_model

    torch.manual_seed(0)
    model = create_model("digits/4", img_size=(8, 12), hidden_dim=8, num_blocks=2, tokens_mlp_dim=6,
                         channels_mlp_dim=8, num_classes=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    perm = FixedPermutation("patches", (8, 12), patch_size=4, seed=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    w = state["stem.proj.weight"]
    state["stem.proj.weight"] = w.flatten(2)[..., perm.pixel_order].reshape(w.shape)
    for i in range(2):
        key = f"blocks.{i}.mlp_tokens."
        state[key + "fc1.weight"] = state[key + "fc1.weight"][:, perm.patch_order]
        state[key + "fc2.weight"] = state[key + "fc2.weight"][perm.patch_order]
        state[key + "fc2.bias"] = state[key + "fc2.bias"][perm.patch_order]
    shuffled_model = create_model(model.config)
    shuffled_model.load_state_dict(state)
    shuffled_model.eval()
    x = torch.randn(5, 3, 8, 12)
    with torch.no_grad():
        torch.testing.assert_close(shuffled_model(perm(x)), model(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(perm(x)), model(x), atol=1e-3)  # the shuffle does change inputs
