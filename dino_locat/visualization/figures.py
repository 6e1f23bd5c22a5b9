"""Matplotlib figures (Agg canvas, no pyplot state) for attention and GAug.

Sizes are fixed in pixels so a saved PNG has a known shape: ``PANEL_PX`` square per map
panel plus a ``TITLE_PX`` band on top, at ``DPI``; the var/alpha and trend summaries are
``SUMMARY_SIZE_PX``. Maps are drawn at patch resolution and stretched over the image with
``extent`` (nearest neighbour), so the array held by each panel is the model's own map.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from dino_locat.files import atomic_write

DPI = 100
PANEL_PX = 150
TITLE_PX = 90
SUMMARY_SIZE_PX = (1000, 450)
ATTENTION_CMAP = "inferno"
BIAS_CMAP = "viridis"


def new_figure(width_px: int, height_px: int) -> Figure:
    """A figure of exactly ``width_px`` x ``height_px`` pixels when saved at ``DPI``."""
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def title_band(fig: Figure, text: str, width_px: int) -> None:
    """Wrap ``text`` to the figure width above the panels (the band fits about five lines)."""
    lines = []
    for paragraph in text.split("\n"):
        lines += textwrap.wrap(paragraph, width=max(30, width_px // 6))
    fig.text(0.5, 1.0 - 6 / fig.bbox.height, "\n".join(lines), ha="center", va="top", fontsize=8)


def panel_grid(fig: Figure, rows: int, cols: int, height_px: int) -> np.ndarray:
    """A rows x cols array of bare axes below the title band."""
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(
        left=0.01,
        right=0.99,
        bottom=0.01,
        top=1.0 - TITLE_PX / height_px,
        wspace=0.05,
        hspace=0.2,
    )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return axes


def draw_map(ax: Axes, values: np.ndarray, size: tuple[int, int], cmap: str, **kwargs) -> None:
    """Draw a patch-resolution map stretched over an image of ``size`` (height, width)."""
    height, width = size
    ax.imshow(values, cmap=cmap, extent=(0, width, height, 0), interpolation="nearest", **kwargs)


def draw_picture(ax: Axes, picture: np.ndarray, **kwargs) -> None:
    """Draw an (H, W, 3) image on the same pixel-edge extent as the maps drawn over it."""
    height, width = picture.shape[:2]
    ax.imshow(picture, extent=(0, width, height, 0), **kwargs)


def summary_layout(fig: Figure) -> None:
    """Two side-by-side plots under a short title (the summary figures)."""
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.86, wspace=0.22)


def variance_axis(ax: Axes, cap: float | None, lowest: float) -> None:
    """Log scale spanning collapse (towards 0) to saturation (the cap c), plain numbers.

    Without a known cap the axis stays linear around the data.
    """
    if cap is None:
        return
    ax.set_yscale("log")
    ax.set_ylim(min(0.01, lowest / 2), cap * 2)
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def attention_figure(
    pictures: np.ndarray, attention: np.ndarray, masks: np.ndarray | None, title: str
) -> Figure:
    """Per image a row [image, head 0 .. head H-1] of CLS attention (DINO style).

    With ``masks`` each image gets a second row: the image with the thresholded patches
    of each head kept and the rest dimmed.
    """
    num_images, num_heads = attention.shape[:2]
    rows_per_image = 1 if masks is None else 2
    width, height = (1 + num_heads) * PANEL_PX, num_images * rows_per_image * PANEL_PX + TITLE_PX
    fig = new_figure(width, height)
    title_band(fig, title, width)
    axes = panel_grid(fig, num_images * rows_per_image, 1 + num_heads, height)
    size = pictures.shape[1:3]
    for i in range(num_images):
        row = axes[i * rows_per_image]
        draw_picture(row[0], pictures[i])
        row[0].set_title(f"image {i}", fontsize=7)
        for head in range(num_heads):
            draw_map(row[1 + head], attention[i, head], size, ATTENTION_CMAP)
            row[1 + head].set_title(f"head {head}", fontsize=7)
        if masks is None:
            continue
        mask_row = axes[i * rows_per_image + 1]
        draw_picture(mask_row[0], pictures[i])
        mask_row[0].set_title("image", fontsize=7)
        for head in range(num_heads):
            draw_picture(mask_row[1 + head], pictures[i])
            shade = np.where(masks[i, head], np.nan, 0.0)
            draw_map(mask_row[1 + head], shade, size, "gray", alpha=0.75, vmin=0.0, vmax=1.0)
            mask_row[1 + head].set_title(f"head {head} top mass", fontsize=7)
    return fig


def gaug_bias_figure(
    picture: np.ndarray, bias: np.ndarray, query: tuple[int, int], patch_size: int, title: str
) -> Figure:
    """Rows = blocks, columns = heads: the bias S from ``query`` to every patch.

    Each panel has its own colour scale (alpha differs a lot between heads) and marks the
    query patch with a red square; the image shows faintly underneath.
    """
    num_blocks, num_heads = bias.shape[:2]
    width, height = num_heads * PANEL_PX, num_blocks * PANEL_PX + TITLE_PX
    fig = new_figure(width, height)
    title_band(fig, title, width)
    axes = panel_grid(fig, num_blocks, num_heads, height)
    size = picture.shape[:2]
    row, col = query
    for block in range(num_blocks):
        for head in range(num_heads):
            ax = axes[block, head]
            draw_picture(ax, picture.mean(axis=-1), cmap="gray", alpha=0.5)
            draw_map(ax, bias[block, head], size, BIAS_CMAP, alpha=0.8)
            ax.add_patch(
                Rectangle(
                    (col * patch_size, row * patch_size),
                    patch_size,
                    patch_size,
                    fill=False,
                    edgecolor="red",
                    linewidth=1.0,
                )
            )
            ax.set_title(f"block {block} head {head} max {bias[block, head].max():.2g}", fontsize=6)
    return fig


def var_alpha_figure(values: Sequence[dict[str, np.ndarray]], cap: float, title: str) -> Figure:
    """Box plots per block of every query's var (row and column axis) and alpha."""
    fig = new_figure(*SUMMARY_SIZE_PX)
    title_band(fig, title, SUMMARY_SIZE_PX[0])
    ax_var, ax_alpha = fig.subplots(1, 2)
    summary_layout(fig)
    blocks = np.arange(len(values))
    for axis, (name, color, shift) in enumerate(
        (("row", "tab:blue", -0.2), ("col", "tab:orange", 0.2))
    ):
        data = [v["var"][..., axis].ravel() for v in values]
        parts = ax_var.boxplot(
            data,
            positions=blocks + shift,
            widths=0.35,
            showfliers=False,
            patch_artist=True,
            medianprops={"color": "black"},
        )
        for box in parts["boxes"]:
            box.set_facecolor(color)
        ax_var.plot([], [], color=color, linewidth=6, label=f"var ({name} axis)")
    ax_var.axhline(cap, color="red", linestyle="--", linewidth=1, label=f"cap c = {cap:g}")
    ax_var.axhline(
        1.0, color="gray", linestyle=":", linewidth=1, label="zero-logit value (1 patch²)"
    )
    variance_axis(ax_var, cap, min(float(v["var"].min()) for v in values))
    ax_var.set_ylabel("variance (patches²)")
    ax_var.legend(fontsize=7, loc="best")
    ax_alpha.boxplot([v["alpha"].ravel() for v in values], positions=blocks, showfliers=False)
    ax_alpha.axhline(
        np.log(2.0), color="gray", linestyle=":", linewidth=1, label="zero-logit value (ln 2)"
    )
    ax_alpha.set_ylabel("alpha (bias amplitude)")
    ax_alpha.set_ylim(bottom=0.0)
    ax_alpha.legend(fontsize=7, loc="best")
    for ax in (ax_var, ax_alpha):
        ax.set_xticks(blocks, [str(b) for b in blocks])
        ax.set_xlabel("block")
        ax.set_xlim(-0.7, len(values) - 0.3)
    return fig


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Save ``fig`` as a PNG of its exact pixel size, atomically."""
    return atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=DPI))
