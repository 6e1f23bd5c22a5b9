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


def _rows_per_chunk(batch_heads: int, num_tokens: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, batch_heads * num_tokens))


def _biased_scores(
    q_chunk: Tensor, k_t: Tensor, scale: float, row: Tensor, col: Tensor, start: int, prefix: int
) -> Tensor:
    """float32 logits ``q k^T * scale + S`` for the query rows [start, start + len)."""
    scores = torch.matmul(q_chunk, k_t).float().mul_(scale)
    stop = start + q_chunk.shape[-2]
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
        out = torch.empty_like(q)
        lse = torch.empty(b, h, n, 1, device=q.device, dtype=torch.float32)
        step = _rows_per_chunk(b * h, n)
        for start in range(0, n, step):
            stop = min(n, start + step)
            scores = _biased_scores(q[:, :, start:stop], k_t, scale, row, col, start, prefix)
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
        delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)
        k_t, v_t = k.transpose(-1, -2), v.transpose(-1, -2)
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
        grad_row = torch.zeros_like(row_d)
        grad_col = torch.zeros_like(col_d)
        step = _rows_per_chunk(b * h, n)
        for start in range(0, n, step):
            stop = min(n, start + step)
            q_c, go_c = q[:, :, start:stop], grad_out[:, :, start:stop]
            probs = _biased_scores(q_c, k_t, scale, row_d, col_d, start, prefix)
            probs.sub_(lse[:, :, start:stop]).exp_()
            dv += torch.matmul(probs.transpose(-1, -2).to(go_c.dtype), go_c).float()
            dscores = torch.matmul(go_c, v_t).float().sub_(delta[:, :, start:stop]).mul_(probs)
            ds_low = dscores.to(q.dtype)
            dq[:, :, start:stop] = torch.matmul(ds_low, k).mul_(scale)
            dk += torch.matmul(ds_low.transpose(-1, -2), q_c).float().mul_(scale)
            first_patch = max(start, prefix)
            if first_patch < stop:
                lo, hi = first_patch - prefix, stop - prefix
                block = dscores[:, :, first_patch - start :, prefix:]
                block = block.reshape(b, h, hi - lo, grid[0], grid[1])
                grad_row[:, :, lo:hi] = torch.matmul(block, col_d[:, :, lo:hi].unsqueeze(-1)).squeeze(-1)
                grad_col[:, :, lo:hi] = torch.matmul(row_d[:, :, lo:hi].unsqueeze(-2), block).squeeze(-2)
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
