"""Converting a Mixer to another input resolution (paper Appendix C, SPEC §5).

The token count S is baked into the token-mixing weights W1 (D_S×S) and W2 (S×D_S). For an integer
factor K_h×K_w, the paper's conversion widens the token MLP to K_h·K_w·D_S and makes it block-diagonal:
each copy of the pre-trained MLP processes exactly the tokens of one of the K_h×K_w spatial parts, so an
image made of tiles gives each tile's original features (`method="blockdiag"`, the default).

Beyond the paper, `method="resample"` handles any multiple of the patch (the factor need not be an
integer): the weights are resampled over the patch grid, keeping D_S. It is only an approximation; docs/paper-tools.md
compares the two.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .checkpoints import unwrap
from .model import MlpMixer
from .recipes import RESIZE_METHODS
from .variants import MixerConfig, Size, as_pair, paper_variant_of


def part_major_index(grid: tuple[int, int], factors: tuple[int, int]) -> torch.Tensor:
    """For each token of the enlarged grid (row-major), its position in part-major order.

    The enlarged grid is (K_h·g_h)×(K_w·g_w); the parts are its K_h×K_w tiles of g_h×g_w tokens,
    numbered row-major. In part-major order, part p's tokens occupy positions p·S … p·S+S−1 in the
    part's own row-major order — the order in which a block-diagonal matrix's blocks see them.
    """
    (gh, gw), (kh, kw) = grid, factors
    rows = torch.arange(kh * gh)[:, None]
    cols = torch.arange(kw * gw)[None, :]
    part = (rows // gh) * kw + cols // gw
    local = (rows % gh) * gw + cols % gw
    return (part * (gh * gw) + local).reshape(-1)


def integer_factors(old: tuple[int, int], new: tuple[int, int]) -> tuple[int, int]:
    """(K_h, K_w) with new = K·old per side, or a ValueError saying why there is none."""
    if new[0] % old[0] or new[1] % old[1]:
        raise ValueError(
            f"{new[0]}×{new[1]} is not an integer multiple of the model's {old[0]}×{old[1]} per side, which "
            "the paper's block-diagonal conversion needs; choose such a size, or use the approximate "
            "resampling that takes any multiple of the patch (method='resample'; on the command line "
            "`--method resample` for `mixer resize`, `--resize-method resample` for `mixer finetune`)."
        )
    return (new[0] // old[0], new[1] // old[1])


def _check_token_mlps(model: MlpMixer) -> None:
    cfg = model.config
    expected = (cfg.tokens_mlp_dim, cfg.num_tokens)
    for i, block in enumerate(model.blocks):
        shape = tuple(block.mlp_tokens.fc1.weight.shape)
        back = tuple(block.mlp_tokens.fc2.weight.shape)
        if shape != expected or back != expected[::-1]:
            raise ValueError(
                f"Block {i}'s token-mixing weights are {shape} and {back}, not the {expected} and "
                f"{expected[::-1]} that {cfg.describe()} at {cfg.img_size[0]}×{cfg.img_size[1]} needs; "
                "the checkpoint does not match its configuration, so it cannot be resized."
            )


@torch.no_grad()
def _blockdiag(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
               grid: tuple[int, int], factors: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """SPEC §5: K copies of the MLP on the block diagonal, token axis regrouped part-major."""
    k = factors[0] * factors[1]
    index = part_major_index(grid, factors).to(w1.device)
    # Columns of W1' (and rows of W2') are new tokens in row-major order: pick each one's
    # part-major column of the plain block-diagonal matrix.
    w1_new = torch.block_diag(*[w1] * k)[:, index]
    w2_new = torch.block_diag(*[w2] * k)[index, :]
    return w1_new, b1.repeat(k), w2_new, b2.repeat(k)[index]


@torch.no_grad()
def _resample_grid(t: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int], mode: str) -> torch.Tensor:
    """(rows, gh·gw) viewed as images over the patch grid -> (rows, gh'·gw')."""
    # Interpolation kernels need float32 or float64; half-precision weights go through float32.
    work = t if t.dtype in (torch.float32, torch.float64) else t.float()
    images = work.reshape(t.shape[0], 1, *grid)
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    out = F.interpolate(images, size=new_grid, mode=mode, **kwargs)
    return out.reshape(t.shape[0], -1).to(t.dtype)


@torch.no_grad()
def _resample(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
              grid: tuple[int, int], new_grid: tuple[int, int], mode: str) -> tuple[torch.Tensor, ...]:
    """Each hidden unit's input weights (a row of W1) and output weights (a column of W2) and the
    output bias b2 are images over the patch grid; resample them to the new grid.

    A hidden unit sums over all tokens, and an upscaled image has S'/S tokens per original one, so W1
    is scaled by S/S' to keep the hidden pre-activations; each output token reads its hidden units
    through its own row of W2, which keeps its scale.
    """
    ratio = (grid[0] * grid[1]) / (new_grid[0] * new_grid[1])
    w1_new = _resample_grid(w1, grid, new_grid, mode) * ratio
    w2_new = _resample_grid(w2.T, grid, new_grid, mode).T.contiguous()
    b2_new = _resample_grid(b2[None], grid, new_grid, mode)[0]
    return w1_new, b1.clone(), w2_new, b2_new


def resize_to(model: MlpMixer, img_size: Size, method: str = "blockdiag", mode: str = "bicubic") -> MlpMixer:
    """A new Mixer for `img_size` images (int or (height, width)) with `model`'s weights converted.

    `method="blockdiag"` (default) is the paper's exact conversion for a size that is an integer
    multiple K_h×K_w of the current one: the token MLPs become K_h·K_w·D_S wide, and an image made of
    tiles gives logits equal to the mean of the tiles' logits. `method="resample"` works for any
    multiple of the patch size, keeps D_S, and resamples the token-MLP weights over the patch grid with
    `mode` ("bicubic", "bilinear" or "nearest"); it is an approximation, not in the paper.
    `model` itself is left unchanged. A wrapped model (`fast.optimize(model)`, `torch.compile(model)`,
    DistributedDataParallel) is resized as the MlpMixer inside it, and the result is a plain MlpMixer:
    wrap it again if wanted.
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"Unknown resize method {method!r}; use one of {', '.join(RESIZE_METHODS)}.")
    model = unwrap(model, "resize_to")  # the wrappers' own names (`_orig_mod.`, ...) are not the model's
    cfg = model.config
    new_size = as_pair(img_size)
    (ph, pw) = cfg.patch_size
    if min(new_size) < 1 or new_size[0] % ph or new_size[1] % pw:
        raise ValueError(
            f"Image size {new_size[0]}×{new_size[1]} is not a multiple of {cfg.describe()}'s {ph}×{pw} "
            "patch; choose a size divisible by the patch."
        )
    _check_token_mlps(model)
    grid = cfg.grid
    new_grid = (new_size[0] // ph, new_size[1] // pw)
    if method == "blockdiag":
        factors = integer_factors(cfg.img_size, new_size)
        tokens_mlp_dim = cfg.tokens_mlp_dim * factors[0] * factors[1]
    else:
        if mode not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"Unknown resampling mode {mode!r}; use bicubic, bilinear or nearest.")
        tokens_mlp_dim = cfg.tokens_mlp_dim
    # The resized model is still the named variant at another resolution, as the paper says
    # "Mixer-L/16 at 448", even though D_S grew.
    name = cfg.name or paper_variant_of(cfg) or ""
    new_cfg: MixerConfig = cfg.replace(img_size=new_size, tokens_mlp_dim=tokens_mlp_dim, name=name)

    # Built on the meta device: every weight comes from `state`, so initialising them would be wasted
    # work (seconds for B/16). The clones give the new model its own weights on the old one's device.
    with torch.device("meta"):
        new = MlpMixer(new_cfg, model.global_pool)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, block in enumerate(model.blocks):
        fc1, fc2 = block.mlp_tokens.fc1, block.mlp_tokens.fc2
        args = (fc1.weight, fc1.bias, fc2.weight, fc2.bias, grid)
        if method == "blockdiag":
            w1, b1, w2, b2 = _blockdiag(*args, factors)
        else:
            w1, b1, w2, b2 = _resample(*args, new_grid, mode)
        prefix = f"blocks.{i}.mlp_tokens."
        state.update({prefix + "fc1.weight": w1, prefix + "fc1.bias": b1,
                      prefix + "fc2.weight": w2, prefix + "fc2.bias": b2})
    new.load_state_dict(state, assign=True)
    new.class_names = copy.copy(model.class_names)
    new.grad_checkpointing = model.grad_checkpointing
    new.train(model.training)
    return new
