"""The numbers every locality figure draws, computed from the model's own public paths.

Kept apart from the drawing code so that a test can check that a figure shows exactly
what the model computes (``get_attention_maps`` for the CLS row, ``get_gaussian_biases``
for the GAug bias, ``recording_gaug`` for var/alpha).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from dino_locat.models import VisionTransformer

Patch = tuple[int, int]


def unwrap(model: torch.nn.Module) -> VisionTransformer:
    """The backbone inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def display_images(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) normalised tensors -> (B, H, W, 3) floats in [0, 1] for drawing.

    Min-max per image, so the picture is right whatever normalisation the loader used.
    """
    x = images.detach().float().cpu()
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - low) / (high - low).clamp_min(1e-8)
    return x.permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def cls_attention(model: VisionTransformer, images: Tensor) -> np.ndarray:
    """Last block's CLS-to-patch attention per head: (B, H, h, w) float32."""
    maps, (h, w) = model.get_attention_maps(images)
    last = maps[-1][:, :, 0, model.num_prefix_tokens :]
    return last.float().reshape(last.shape[0], last.shape[1], h, w).cpu().numpy()


def threshold_masks(attention: np.ndarray, threshold: float) -> np.ndarray:
    """Keep the fewest patches holding at least ``threshold`` of each map's attention mass.

    ``attention``: (..., h, w). Returns a boolean array of the same shape.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"--threshold must be in (0, 1], got {threshold}")
    flat = attention.reshape(-1, attention.shape[-2] * attention.shape[-1])
    order = np.argsort(-flat, axis=-1, kind="stable")
    ranked = np.take_along_axis(flat, order, axis=-1)
    mass = ranked / ranked.sum(axis=-1, keepdims=True)
    mass_before = np.cumsum(mass, axis=-1) - mass
    keep_ranked = mass_before < threshold
    keep = np.zeros_like(keep_ranked)
    np.put_along_axis(keep, order, keep_ranked, axis=-1)
    return keep.reshape(attention.shape)


def default_query_patches(grid: tuple[int, int]) -> list[Patch]:
    """The centre patch and the top-left corner: one interior and one border query."""
    h, w = grid
    return [(h // 2, w // 2), (0, 0)]


def check_query_patches(queries: Sequence[Patch], grid: tuple[int, int]) -> list[Patch]:
    """Validate (row, col) query patches against the patch grid, with a clear error."""
    h, w = grid
    for row, col in queries:
        if not (0 <= row < h and 0 <= col < w):
            raise ValueError(
                f"--query_patches {row},{col} lies outside the {h}x{w} patch grid "
                f"(rows 0..{h - 1}, cols 0..{w - 1})"
            )
    return [(int(r), int(c)) for r, c in queries]


@torch.no_grad()
def gaug_bias_maps(
    model: VisionTransformer, images: Tensor, queries: Sequence[Patch]
) -> np.ndarray:
    """GAug bias S from each query patch to every patch: (B, Q, blocks, H, h, w) float32."""
    biases, (h, w) = model.get_gaussian_biases(images)
    queries = check_query_patches(queries, (h, w))
    prefix = model.num_prefix_tokens
    rows = [prefix + r * w + c for r, c in queries]
    stacked = torch.stack([b[:, :, rows, prefix:] for b in biases], dim=1)  # B, L, H, Q, Np
    stacked = stacked.permute(0, 3, 1, 2, 4).float()
    return stacked.reshape(*stacked.shape[:4], h, w).cpu().numpy()


@torch.no_grad()
def gaug_values(model: VisionTransformer, images: Tensor) -> list[dict[str, np.ndarray]]:
    """Per block, var (B, H, Np, 2) and alpha (B, H, Np) of every patch query."""
    with model.recording_gaug():
        model(images)
        stats = model.gaug_statistics()
    return [{"var": s["var"].cpu().numpy(), "alpha": s["alpha"].cpu().numpy()} for s in stats]
