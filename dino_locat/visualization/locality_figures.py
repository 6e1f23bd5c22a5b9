"""One set of locality figures for a batch of images: used by the CLI and by training.

A plain ViT gets the CLS-attention panel only, with a note (in the title, the figure
name and the return value) that it has no GAug; a LocAtViT also gets the GAug bias of
chosen query patches per block and head, and the var/alpha distribution per block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from dino_locat.models import VisionTransformer
from dino_locat.visualization.figures import attention_figure, gaug_bias_figure, var_alpha_figure
from dino_locat.visualization.maps import (
    Patch,
    check_query_patches,
    cls_attention,
    default_query_patches,
    display_images,
    gaug_bias_maps,
    gaug_values,
    threshold_masks,
    unwrap,
)

NO_GAUG_NOTE = (
    "plain ViT: no GAug in this model, so there is no locality bias, var or alpha to show "
    "(CLS attention only)"
)


@dataclass
class LocalityFigures:
    """The figures (by name: a file stem or TensorBoard tag) and the arrays they draw."""

    figures: dict[str, Figure]
    cls_attention: np.ndarray
    masks: np.ndarray | None
    queries: list[Patch] = field(default_factory=list)
    gaug_bias: np.ndarray | None = None
    gaug: list[dict[str, np.ndarray]] | None = None
    note: str | None = None


def describe(model: VisionTransformer) -> str:
    """A short model label for figure titles: family, width, depth, heads and patch size."""
    family = "LocAtViT" if model.locality else "ViT"
    return (
        f"{family} {model.embed_dim}d x {len(model.blocks)} blocks x {model.num_heads} heads, "
        f"patch {model.patch_size}"
    )


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no drop path) for the duration, then the caller's mode back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def locality_figures(
    model: torch.nn.Module,
    images: Tensor,
    threshold: float | None = None,
    queries: Sequence[Patch] | None = None,
    bias_images: int | None = None,
    label: str | None = None,
) -> LocalityFigures:
    """Compute and draw every locality figure for ``images`` (B, 3, H, W), normalised.

    ``queries``: (row, col) patches for the GAug bias (default: centre and top-left).
    ``bias_images``: how many of the images get bias figures (default: all).
    """
    if bias_images is not None and bias_images < 0:
        raise ValueError(f"--bias_images must be >= 0, got {bias_images}")
    model = unwrap(model)
    device = next(model.parameters()).device
    images = images.to(device=device, dtype=torch.float32)
    label = label or describe(model)
    pictures = display_images(images)
    with evaluating(model):
        attention = cls_attention(model, images)
        masks = None if threshold is None else threshold_masks(attention, threshold)
        kept = "" if threshold is None else f"; lower rows: top {threshold:g} of attention mass"
        if not model.locality:
            print(f"[visualize] {label}: {NO_GAUG_NOTE}")
            title = f"{label} - CLS attention, last block{kept}\nNOTE: {NO_GAUG_NOTE}"
            figure = attention_figure(pictures, attention, masks, title)
            return LocalityFigures(
                {"cls_attention_no_gaug": figure}, attention, masks, note=NO_GAUG_NOTE
            )
        title = f"{label} - CLS attention, last block{kept}"
        figures = {"cls_attention": attention_figure(pictures, attention, masks, title)}
        grid = attention.shape[-2:]
        queries = check_query_patches(queries or default_query_patches(grid), grid)
        count = len(images) if bias_images is None else min(bias_images, len(images))
        bias = gaug_bias_maps(model, images[:count], queries)
        for i in range(count):
            for q, (row, col) in enumerate(queries):
                title = (
                    f"{label} - GAug bias S of query patch (row {row}, col {col}) on image {i}; "
                    "rows: blocks, columns: heads"
                )
                figures[f"gaug_bias_img{i}_q{row}-{col}"] = gaug_bias_figure(
                    pictures[i], bias[i, q], (row, col), model.patch_size, title
                )
        values = gaug_values(model, images)
        cap = model.blocks[0].attn.gaug.cap
        title = (
            f"{label} - GAug var and alpha per block over {len(images)} images' patch queries "
            "and all heads"
        )
        figures["gaug_var_alpha"] = var_alpha_figure(values, cap, title)
    return LocalityFigures(figures, attention, masks, queries, bias, values)
