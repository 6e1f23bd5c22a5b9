"""GAug and PRR, the two LocAtViT additions to a plain ViT.

Design: docs/architecture.md#the-backbone.

GAug adds to the attention logits of every patch query ``i`` a Gaussian bump centred on
``i``'s own grid position, ``S(i, j) = alpha_i * exp(D_row(i, j) / (var_row_i + eps) +
D_col(i, j) / (var_col_i + eps))``, whose per-axis variance and amplitude are predicted
from the query itself. The exponent separates by axis, so the bias of one query is the
outer product of a row factor (length h) and a column factor (length w): this module
only ever builds those small factors; the full (N x N) bias is formed where it is needed.

Axis order of the variance logits: index 0 is the row (vertical) axis, index 1 the column.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS_START = 0.1
FP16_SAFE_RATIO = 32500.0
DISTANCE_FLOOR = -6550.0


def gaug_constants(native_grid: tuple[int, int]) -> tuple[float, float, float]:
    """Return (variance cap c, eps, distance clamp) for a model's native patch grid.

    They depend on the native grid only, so that one model uses one set of constants at
    every input size.
    """
    span = max(native_grid)
    if span < 2:
        raise ValueError(f"GAug needs a native grid of at least 2 patches, got {native_grid}")
    cap = float(span * span)
    half_sq = 0.5 * (span - 1) ** 2
    eps = EPS_START
    while half_sq / eps**2 > FP16_SAFE_RATIO:
        eps *= 2.0
    clamp = max(-half_sq, DISTANCE_FLOOR)
    return cap, eps, clamp


def axis_distances(size: int, clamp: float, device: torch.device) -> Tensor:
    """(size, size) table of ``max(-0.5 * (a - b)^2, clamp)`` in float32."""
    pos = torch.arange(size, device=device, dtype=torch.float32)
    return (-0.5 * (pos[:, None] - pos[None, :]) ** 2).clamp_min(clamp)


@functools.lru_cache(maxsize=64)
def query_distances(
    grid: tuple[int, int], clamp: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Per patch query (row-major), its clamped distances to every row and every column.

    Returns (Np, h) and (Np, w) tables with Np = h * w. They are constants of the grid,
    cached so that a forward does not rebuild them in every layer.
    """
    h, w = grid
    with torch.inference_mode(False), torch.no_grad():  # usable later with autograd on
        d_row = axis_distances(h, clamp, device).repeat_interleave(w, dim=0)
        d_col = axis_distances(w, clamp, device).repeat(h, 1)
    return d_row, d_col


def separable_factors(
    var: Tensor, alpha: Tensor, grid: tuple[int, int], clamp: float, eps: float
) -> tuple[Tensor, Tensor]:
    """Row factor (alpha folded in) and column factor of the bias, both float32.

    ``var``: (..., Np, 2), ``alpha``: (..., Np). Returns (..., Np, h) and (..., Np, w) with
    ``S(i, r * w + c) = row[i, r] * col[i, c]``.
    """
    d_row, d_col = query_distances(grid, clamp, var.device)
    row = alpha.unsqueeze(-1) * torch.exp(d_row / (var[..., 0:1] + eps))
    col = torch.exp(d_col / (var[..., 1:2] + eps))
    return row, col


def dense_bias(
    var: Tensor, alpha: Tensor, grid: tuple[int, int], clamp: float, eps: float, num_tokens: int
) -> Tensor:
    """The full (..., N, N) float32 bias with zero rows and columns for prefix tokens."""
    row, col = separable_factors(var, alpha, grid, clamp, eps)
    num_patches = row.shape[-2]
    prefix = num_tokens - num_patches
    patch_bias = (row.unsqueeze(-1) * col.unsqueeze(-2)).flatten(-2)
    return F.pad(patch_bias, (prefix, 0, prefix, 0))


class GAug(nn.Module):
    """Predicts each patch query's Gaussian variance (per axis) and amplitude.

    The two linear maps act on the per-head query vectors and are shared by all heads of
    a layer; their names (``log_var``, ``log_alpha``) match the public timm LocAtViT
    state_dicts.
    """

    def __init__(self, head_dim: int, native_grid: tuple[int, int]) -> None:
        super().__init__()
        self.log_var = nn.Linear(head_dim, 2)
        self.log_alpha = nn.Linear(head_dim, 1)
        self.native_grid = tuple(native_grid)
        self.cap, self.eps, self.clamp = gaug_constants(self.native_grid)
        self.record = False
        self.recorded: dict[str, Tensor] | None = None

    def variance_scale(self, grid: tuple[int, int]) -> float:
        """Variances shrink/grow with the grid so a local crop sees the same relative reach."""
        if tuple(grid) == self.native_grid:
            return 1.0
        return min(grid) / min(self.native_grid)

    def from_logits(self, z: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Map (..., Np, 3) logits [var_row, var_col, alpha] to var (..., Np, 2) and alpha."""
        z = z.float()
        var = self.cap * torch.sigmoid(z[..., :2] - math.log(self.cap - 1.0))
        scale = self.variance_scale(grid)
        if scale != 1.0:
            var = var * scale
        alpha = F.softplus(z[..., 2])
        if self.record:
            self.recorded = {"var": var.detach(), "alpha": alpha.detach()}
        return var, alpha

    def forward(self, q: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """var (B, H, Np, 2) and alpha (B, H, Np) from per-head queries q (B, H, N, d).

        The logits are computed for all N tokens and the prefix rows dropped afterwards:
        with a contiguous ``q`` the linear map then keeps ``q`` itself for its backward
        (shared with the attention's), instead of a copy of the patch rows.
        """
        weight = torch.cat([self.log_var.weight, self.log_alpha.weight]).to(q.dtype)
        bias = torch.cat([self.log_var.bias, self.log_alpha.bias]).to(q.dtype)
        z = F.linear(q, weight, bias)
        return self.from_logits(z[:, :, q.shape[-2] - grid[0] * grid[1] :], grid)


def patch_representation_refinement(x: Tensor, num_heads: int) -> Tensor:
    """PRR: per-head, parameter-free self-attention ``softmax(x x^T / sqrt(d)) x``."""
    b, n, dim = x.shape
    heads = x.reshape(b, n, num_heads, dim // num_heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(heads, heads, heads)
    return out.transpose(1, 2).reshape(b, n, dim)
