"""GAug and PRR against independent reference computations written from the formulas.

The references below use plain Python loops over query/key patches (or einsum) and their
own constants; they share no code with dino_locat.models.locality.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dino_locat.models import build_backbone
from dino_locat.models.biased_attention import gaussian_biased_attention
from dino_locat.models.locality import dense_bias, gaug_constants


def reference_eps(native: int) -> float:
    eps = 0.1
    while 0.5 * (native - 1) ** 2 / (eps * eps) > 32500:
        eps = eps * 2
    return eps


@torch.no_grad()
def reference_bias(attn, x: torch.Tensor, grid, native) -> torch.Tensor:
    """S for every (batch, head, query, key), by loops, from the attention's weights."""
    b, n, dim = x.shape
    heads = attn.num_heads
    hd = dim // heads
    gh, gw = grid
    c = float(max(native) ** 2)
    eps = reference_eps(max(native))
    floor = max(-0.5 * (max(native) - 1) ** 2, -6550.0)
    scale = 1.0 if tuple(grid) == tuple(native) else min(grid) / min(native)
    q = x @ attn.qkv.weight[:dim].T + attn.qkv.bias[:dim]
    w_var, b_var = attn.gaug.log_var.weight, attn.gaug.log_var.bias
    w_a, b_a = attn.gaug.log_alpha.weight, attn.gaug.log_alpha.bias
    out = torch.zeros(b, heads, n, n, dtype=torch.float64)
    prefix = n - gh * gw
    for bi in range(b):
        for hi in range(heads):
            for i in range(gh * gw):
                qi = q[bi, prefix + i, hi * hd : (hi + 1) * hd].double()
                z = qi @ w_var.double().T + b_var.double()
                var = [c / (1 + math.exp(-(float(zv) - math.log(c - 1)))) * scale for zv in z]
                alpha = math.log1p(math.exp(float(qi @ w_a.double()[0] + b_a.double()[0])))
                ri, ci = divmod(i, gw)
                for j in range(gh * gw):
                    rj, cj = divmod(j, gw)
                    d_row = max(-0.5 * (ri - rj) ** 2, floor)
                    d_col = max(-0.5 * (ci - cj) ** 2, floor)
                    out[bi, hi, prefix + i, prefix + j] = alpha * math.exp(
                        d_row / (var[0] + eps) + d_col / (var[1] + eps)
                    )
    return out


def tiny_locatvit(img_size: int, patch_size: int, **kw):
    torch.manual_seed(0)
    model = build_backbone(
        "locatvit_t",
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=16,
        num_heads=2,
        depth=kw.pop("depth", 1),
        **kw,
    )
    # non-trivial GAug weights so that var and alpha differ per query and head
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.gaug.log_var.weight, std=0.5)
        torch.nn.init.normal_(block.attn.gaug.log_var.bias, std=0.5)
        torch.nn.init.normal_(block.attn.gaug.log_alpha.weight, std=0.5)
        torch.nn.init.normal_(block.attn.gaug.log_alpha.bias, std=0.5)
    return model.eval()


def block_input(model, image: torch.Tensor):
    tokens, grid = model.prepare_tokens(image)
    return model.blocks[0].norm1(tokens), grid


@pytest.mark.parametrize("img_size,native_size", [(16, 16), (24, 24), (12, 16), (20, 12)])
def test_bias_matches_reference_loops(img_size, native_size):
    model = tiny_locatvit(native_size, 4)
    image = torch.randn(2, 3, img_size, img_size)
    x, grid = block_input(model, image)
    ours = model.blocks[0].attn.gaussian_bias(x, grid)
    ref = reference_bias(model.blocks[0].attn, x, grid, model.native_grid)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-4)


def test_cls_rows_and_columns_are_zero():
    model = tiny_locatvit(16, 4)
    x, grid = block_input(model, torch.randn(2, 3, 16, 16))
    bias = model.blocks[0].attn.gaussian_bias(x, grid)
    assert torch.all(bias[:, :, 0, :] == 0) and torch.all(bias[:, :, :, 0] == 0)
    assert torch.all(bias[:, :, 1:, 1:] > 0)


def test_variance_scaled_on_6x6_grid_of_14x14_model():
    model = tiny_locatvit(56, 4)  # native 14 x 14
    assert model.native_grid == (14, 14)
    attn = model.blocks[0].attn
    x, grid = block_input(model, torch.randn(1, 3, 24, 24))
    assert grid == (6, 6)
    var, _ = attn.gaussian_params(x, grid)
    dim = x.shape[-1]
    q = (x @ attn.qkv.weight[:dim].T + attn.qkv.bias[:dim]).reshape(1, -1, 2, 8).transpose(1, 2)
    z = (
        torch.einsum("bhnd,kd->bhnk", q[:, :, 1:], attn.gaug.log_var.weight)
        + attn.gaug.log_var.bias
    )
    expected = 196.0 * torch.sigmoid(z - math.log(195.0)) * (6 / 14)
    torch.testing.assert_close(var, expected, atol=1e-5, rtol=1e-5)


def test_zero_logits_give_unit_variance():
    model = tiny_locatvit(56, 4)
    gaug = model.blocks[0].attn.gaug
    var, alpha = gaug.from_logits(torch.zeros(1, 1, 196, 3), (14, 14))
    torch.testing.assert_close(var, torch.ones_like(var))
    torch.testing.assert_close(alpha, torch.full_like(alpha, math.log(2.0)))


@pytest.mark.parametrize("native,eps", [(14, 0.1), (28, 0.2), (64, 0.4)])
def test_eps_rule(native, eps):
    cap, ours, clamp = gaug_constants((native, native))
    assert cap == native**2
    assert ours == pytest.approx(eps) and ours == pytest.approx(reference_eps(native))
    assert clamp == pytest.approx(-0.5 * (native - 1) ** 2)


def test_eps_reaches_the_bias_of_a_28_grid_model():
    model = tiny_locatvit(56, 2)  # native 28 x 28 -> eps 0.2
    assert model.blocks[0].attn.gaug.eps == pytest.approx(0.2)
    x, grid = block_input(model, torch.randn(1, 3, 12, 12))
    ours = model.blocks[0].attn.gaussian_bias(x, grid)
    ref = reference_bias(model.blocks[0].attn, x, grid, model.native_grid)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-4)


def test_distance_clamp():
    # native 3x3: floor -0.5 * 2^2 = -2; a 6x6 input has distances up to 5 (-12.5 unclamped)
    model = tiny_locatvit(12, 4)
    assert model.blocks[0].attn.gaug.clamp == -2.0
    x, grid = block_input(model, torch.randn(1, 3, 24, 24))
    ours = model.blocks[0].attn.gaussian_bias(x, grid)
    ref = reference_bias(model.blocks[0].attn, x, grid, model.native_grid)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-4)
    # far keys all get the same (clamped) value along a row of the grid
    row0 = ours[0, 0, 1, 1:7]
    assert torch.allclose(row0[2:], row0[2].expand(4))
    # very large native grids hit the -6550 floor
    assert gaug_constants((128, 128))[2] == -6550.0


def test_prr_formula():
    model = build_backbone(
        "locatvit_t", img_size=16, patch_size=4, embed_dim=12, num_heads=3, depth=1
    )
    tokens = torch.randn(2, 17, 12)
    ours = model.finalize(tokens)
    normed = F.layer_norm(tokens, (12,), model.norm.weight, model.norm.bias, eps=1e-6)
    ref = torch.zeros_like(normed)
    for b in range(2):
        for h in range(3):
            xh = normed[b, :, h * 4 : (h + 1) * 4].double()
            weights = torch.softmax(xh @ xh.T / 2.0, dim=-1)
            ref[b, :, h * 4 : (h + 1) * 4] = (weights @ xh).float()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in model.norm.parameters()) == 24  # PRR itself has none


@pytest.mark.parametrize("arch", ["locatvit_t", "vit_t"])
@pytest.mark.parametrize("grad", [True, False])
def test_attention_map_path_equals_fast_path(arch, grad):
    torch.manual_seed(0)
    model = build_backbone(arch, img_size=32, patch_size=4, depth=1, embed_dim=32, num_heads=4)
    attn = model.blocks[0].attn
    x = torch.randn(2, 65, 32, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        fast = attn(x, (8, 8))
        explicit, maps = attn(x, (8, 8), return_attention=True)
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)
    assert maps.shape == (2, 4, 65, 65)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 4, 65), atol=1e-5, rtol=0)
    if grad:
        g = torch.randn_like(fast)
        params = [x, *attn.parameters()]
        fast_grads = torch.autograd.grad(fast, params, g)
        explicit_grads = torch.autograd.grad(explicit, params, g)
        for a, b in zip(fast_grads, explicit_grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk_elements", [1 << 22, 64])
def test_bias_kernel_gradcheck(monkeypatch, chunk_elements):
    monkeypatch.setattr("dino_locat.models.biased_attention.CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    b, h, gh, gw, d = 2, 2, 3, 4, 4
    n = 1 + gh * gw
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    var = (torch.rand(b, h, gh * gw, 2, dtype=torch.float64) * 3 + 0.3).requires_grad_()
    alpha = torch.rand(b, h, gh * gw, dtype=torch.float64).requires_grad_()

    def fn(*inputs):
        return gaussian_biased_attention(*inputs, (gh, gw), -4.5, 0.1, d**-0.5)

    assert torch.autograd.gradcheck(fn, (q, k, v, var, alpha))
    dense = dense_bias(var, alpha, (gh, gw), -4.5, 0.1, n)
    ref = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5 + dense, dim=-1) @ v
    torch.testing.assert_close(fn(q, k, v, var, alpha), ref)
