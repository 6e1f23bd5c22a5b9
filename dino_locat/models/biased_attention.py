"""Attention with the GAug bias whose backward never stores an (N x N) tensor.

PyTorch's fused SDPA kernels give no gradient for a float ``attn_mask`` on CPU, so a
learnable bias would fall back to the math kernel, which keeps the attention matrix (and
the bias, and its gradient) alive for every layer until backward. This function keeps only
what a flash kernel keeps (q, k, v, the output and the row log-sum-exp) plus the tiny
per-query (var, alpha); backward recomputes the attention in query chunks and returns the
gradients of var and alpha directly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dino_locat.models.locality import separable_factors

CHUNK_ELEMENTS = 1 << 22


def _acc_dtype(t: Tensor) -> torch.dtype:
    """Softmax and bias arithmetic run in float32 at least (float64 stays float64)."""
    return torch.promote_types(t.dtype, torch.float32)


def _rows_per_chunk(batch_heads: int, num_tokens: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, batch_heads * num_tokens))


def _biased_scores(
    q_scaled: Tensor, k_t: Tensor, row: Tensor, col: Tensor, start: int, prefix: int
) -> Tensor:
    """float32 logits ``(q * scale) k^T + S`` for the query rows [start, start + len)."""
    scores = torch.matmul(q_scaled, k_t).to(_acc_dtype(q_scaled))
    stop = start + q_scaled.shape[-2]
    first_patch = max(start, prefix)
    if first_patch < stop:
        b, h, _, n = scores.shape
        grid_h, grid_w = row.shape[-1], col.shape[-1]
        block = scores[:, :, first_patch - start :, prefix:]
        rows = row[:, :, first_patch - prefix : stop - prefix]
        cols = col[:, :, first_patch - prefix : stop - prefix]
        block.view(b, h, stop - first_patch, grid_h, grid_w).addcmul_(
            rows.unsqueeze(-1), cols.unsqueeze(-2)
        )
    return scores


class _GaussianBiasedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, var, alpha, grid, clamp, eps, scale):  # noqa: D401
        b, h, n, _ = q.shape
        prefix = n - grid[0] * grid[1]
        row, col = separable_factors(var, alpha, grid, clamp, eps)
        k_t = k.transpose(-1, -2)
        q_scaled = q * scale
        out = torch.empty_like(q)
        lse = torch.empty(b, h, n, 1, device=q.device, dtype=_acc_dtype(q))
        step = _rows_per_chunk(b * h, n)
        for start in range(0, n, step):
            stop = min(n, start + step)
            scores = _biased_scores(q_scaled[:, :, start:stop], k_t, row, col, start, prefix)
            lse_c = torch.logsumexp(scores, dim=-1, keepdim=True)
            probs = scores.sub_(lse_c).exp_()
            out[:, :, start:stop] = torch.matmul(probs.to(v.dtype), v)
            lse[:, :, start:stop] = lse_c
        ctx.save_for_backward(q, k, v, out, lse, var, alpha)
        ctx.config = (tuple(grid), clamp, eps, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, var, alpha = ctx.saved_tensors
        grid, clamp, eps, scale = ctx.config
        b, h, n, _ = q.shape
        prefix = n - grid[0] * grid[1]
        with torch.enable_grad():
            var_leaf = var.detach().requires_grad_(var.requires_grad)
            alpha_leaf = alpha.detach().requires_grad_(alpha.requires_grad)
            row, col = separable_factors(var_leaf, alpha_leaf, grid, clamp, eps)
        row_d, col_d = row.detach(), col.detach()
        grad_out = grad_out.contiguous()
        acc = _acc_dtype(q)
        delta = (grad_out.to(acc) * out.to(acc)).sum(-1, keepdim=True)
        k_t, v_t = k.transpose(-1, -2), v.transpose(-1, -2)
        q_scaled = q * scale
        dq = torch.empty_like(q)
        dk = dv = None
        grad_row = torch.zeros_like(row_d)
        grad_col = torch.zeros_like(col_d)
        step = _rows_per_chunk(b * h, n)
        for start in range(0, n, step):
            stop = min(n, start + step)
            qs_c, go_c = q_scaled[:, :, start:stop], grad_out[:, :, start:stop]
            probs = _biased_scores(qs_c, k_t, row_d, col_d, start, prefix)
            probs.sub_(lse[:, :, start:stop]).exp_()
            dv_c = torch.matmul(probs.transpose(-1, -2).to(go_c.dtype), go_c).to(acc)
            dscores = torch.matmul(go_c, v_t).to(acc).sub_(delta[:, :, start:stop]).mul_(probs)
            ds_low = dscores.to(q.dtype)
            dq[:, :, start:stop] = torch.matmul(ds_low, k).mul_(scale)
            dk_c = torch.matmul(ds_low.transpose(-1, -2), qs_c).to(acc)
            dk = dk_c if dk is None else dk.add_(dk_c)
            dv = dv_c if dv is None else dv.add_(dv_c)
            first_patch = max(start, prefix)
            if first_patch < stop:
                lo, hi = first_patch - prefix, stop - prefix
                block = dscores[:, :, first_patch - start :, prefix:]
                block = block.reshape(b, h, hi - lo, grid[0], grid[1])
                grad_row[:, :, lo:hi] = torch.matmul(
                    block, col_d[:, :, lo:hi].unsqueeze(-1)
                ).squeeze(-1)
                grad_col[:, :, lo:hi] = torch.matmul(
                    row_d[:, :, lo:hi].unsqueeze(-2), block
                ).squeeze(-2)
        grad_var = grad_alpha = None
        wanted = [t for t in (var_leaf, alpha_leaf) if t.requires_grad]
        if wanted:
            grads = torch.autograd.grad((row, col), wanted, (grad_row, grad_col))
            grads = iter(grads)
            grad_var = next(grads) if var_leaf.requires_grad else None
            grad_alpha = next(grads) if alpha_leaf.requires_grad else None
        return dq, dk.to(k.dtype), dv.to(v.dtype), grad_var, grad_alpha, None, None, None, None


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
