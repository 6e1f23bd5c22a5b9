"""Attention with the GAug bias whose backward never stores an (N x N) tensor.

PyTorch's fused SDPA kernels give no gradient for a float ``attn_mask`` on CPU, so a
learnable bias would fall back to the math kernel, which keeps the attention matrix (and
the bias, and its gradient) alive for every layer until backward. This function keeps only
what a flash kernel keeps (q, k, v, the output and the row log-sum-exp) plus the tiny
per-query (var, alpha); backward recomputes the attention in query chunks and returns the
gradients of var and alpha directly, through the separable form of the bias.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dino_locat.models.locality import query_distances

CHUNK_ELEMENTS = 1 << 22


def _acc_dtype(t: Tensor) -> torch.dtype:
    """Softmax and bias arithmetic run in float32 at least (float64 stays float64)."""
    return torch.promote_types(t.dtype, torch.float32)


def _chunks(batch_heads: int, num_tokens: int) -> list[tuple[int, int]]:
    """Query-row ranges whose (rows x N) score block stays under CHUNK_ELEMENTS per head."""
    step = max(1, CHUNK_ELEMENTS // max(1, batch_heads * num_tokens))
    return [(s, min(num_tokens, s + step)) for s in range(0, num_tokens, step)]


def _gaussians(var: Tensor, grid: tuple[int, int], clamp: float, eps: float):
    """Distance tables and the per-axis Gaussians ``exp(D / (var + eps))`` of every query."""
    d_row, d_col = query_distances(grid, clamp, var.device)
    denom_row, denom_col = var[..., 0:1] + eps, var[..., 1:2] + eps
    return d_row, d_col, denom_row, denom_col, (d_row / denom_row).exp(), (d_col / denom_col).exp()


def _biased_scores(
    q_scaled: Tensor, k_t: Tensor, row: Tensor, col: Tensor, rows: tuple, prefix: int
):
    """Logits ``(q * scale) k^T + S`` (float32 at least) for the query rows [start, stop)."""
    start, stop = rows
    scores = torch.matmul(q_scaled[:, :, start:stop], k_t).to(_acc_dtype(q_scaled))
    first = max(start, prefix)
    if first < stop:
        b, h = scores.shape[:2]
        block = scores[:, :, first - start :, prefix:]
        row_c, col_c = (
            row[:, :, first - prefix : stop - prefix],
            col[:, :, first - prefix : stop - prefix],
        )
        block.view(b, h, stop - first, row.shape[-1], col.shape[-1]).addcmul_(
            row_c.unsqueeze(-1), col_c.unsqueeze(-2)
        )
    return scores


def _join(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


class _GaussianBiasedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, var, alpha, grid, clamp, eps, scale):
        # contiguous k, v: they arrive as strided views of the qkv projection, and every
        # batched matmul below would otherwise copy them again (q is made contiguous by
        # the caller, which shares it with GAug's linear map)
        q_scaled = q * scale
        k, v = k.contiguous(), v.contiguous()
        b, h, n, _ = q.shape
        prefix = n - grid[0] * grid[1]
        *_, e_row, e_col = _gaussians(var, grid, clamp, eps)
        row = alpha.unsqueeze(-1) * e_row
        k_t = k.transpose(-1, -2)
        outs, lses = [], []
        for rows in _chunks(b * h, n):
            scores = _biased_scores(q_scaled, k_t, row, e_col, rows, prefix)
            lse = torch.logsumexp(scores, dim=-1, keepdim=True)
            outs.append(torch.matmul(scores.sub_(lse).exp_().to(v.dtype), v))
            lses.append(lse)
        out, lse = _join(outs, 2), _join(lses, 2)
        ctx.save_for_backward(q, k, v, out, lse, var, alpha)
        ctx.config = (tuple(grid), clamp, eps, scale)
        ctx.wanted = (var.requires_grad, alpha.requires_grad)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, var, alpha = ctx.saved_tensors
        grid, clamp, eps, scale = ctx.config
        q_scaled = q * scale
        b, h, n, _ = q_scaled.shape
        prefix = n - grid[0] * grid[1]
        d_row, d_col, denom_row, denom_col, e_row, e_col = _gaussians(var, grid, clamp, eps)
        row = alpha.unsqueeze(-1) * e_row
        acc = _acc_dtype(q_scaled)
        grad_out = grad_out.contiguous()
        delta = (grad_out.to(acc) * out.to(acc)).sum(-1, keepdim=True)
        k_t, v_t = k.transpose(-1, -2), v.transpose(-1, -2)
        dqs, dk, dv, g_rows, g_cols = [], None, None, [], []
        for start, stop in _chunks(b * h, n):
            go_c = grad_out[:, :, start:stop]
            probs = _biased_scores(q_scaled, k_t, row, e_col, (start, stop), prefix)
            probs.sub_(lse[:, :, start:stop]).exp_()
            dv_c = torch.matmul(probs.transpose(-1, -2).to(go_c.dtype), go_c).to(acc)
            dscores = torch.matmul(go_c, v_t).to(acc).sub_(delta[:, :, start:stop]).mul_(probs)
            ds_low = dscores.to(q_scaled.dtype)
            dqs.append(torch.matmul(ds_low, k).mul_(scale))
            dk_c = torch.matmul(ds_low.transpose(-1, -2), q_scaled[:, :, start:stop]).to(acc)
            dk = dk_c if dk is None else dk.add_(dk_c)
            dv = dv_c if dv is None else dv.add_(dv_c)
            first = max(start, prefix)
            if first < stop:
                lo, hi = first - prefix, stop - prefix
                block = dscores[:, :, first - start :, prefix:]
                block = block.reshape(b, h, hi - lo, grid[0], grid[1])
                g_rows.append(torch.matmul(block, e_col[:, :, lo:hi].unsqueeze(-1)).squeeze(-1))
                g_cols.append(torch.matmul(row[:, :, lo:hi].unsqueeze(-2), block).squeeze(-2))
        grad_var = grad_alpha = None
        if any(ctx.wanted):
            # S = alpha * e_row (x) e_col, e_ax = exp(D_ax / (var_ax + eps))
            g_row, g_col = _join(g_rows, 2), _join(g_cols, 2)
            grad_alpha = (g_row * e_row).sum(-1)
            grad_var = torch.stack(
                [
                    (g_row * row * -d_row).sum(-1) / denom_row.squeeze(-1) ** 2,
                    (g_col * e_col * -d_col).sum(-1) / denom_col.squeeze(-1) ** 2,
                ],
                dim=-1,
            )
        return (
            _join(dqs, 2),
            dk.to(k.dtype),
            dv.to(v.dtype),
            grad_var if ctx.wanted[0] else None,
            grad_alpha if ctx.wanted[1] else None,
            None,
            None,
            None,
            None,
        )


def gaussian_biased_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    var: Tensor,
    alpha: Tensor,
    grid: tuple[int, int],
    clamp: float,
    eps: float,
    scale: float,
) -> Tensor:
    """``softmax(q k^T * scale + S) v`` for (B, H, N, d) inputs; S built from var/alpha.

    The first ``N - h*w`` tokens are prefix (CLS) tokens: their bias rows/columns are 0.
    """
    return _GaussianBiasedAttention.apply(q, k, v, var, alpha, tuple(grid), clamp, eps, scale)
