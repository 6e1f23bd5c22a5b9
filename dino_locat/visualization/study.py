"""The study's figure: final metrics per backbone (one dot per seed), the online k-NN curve of
every run, and the learned GAug variance and amplitude per block of the LocAtViT runs.

Plain numbers in, one PNG out: reading results and runs is the launcher's job.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import colormaps

from dino_locat.visualization.figures import new_figure, save_png
from dino_locat.visualization.trends import GaugTrends

SEED_STYLES = ("-", "--", ":", "-.")


@dataclass
class MetricPanel:
    """One metric: per arch the value of each seed, and reference lines (untrained, pixels)."""

    label: str
    per_arch: dict[str, list[float]]
    references: dict[str, float] = field(default_factory=dict)


@dataclass
class OnlineCurve:
    """A run's teacher 20-NN top-1 against completed epochs (epoch 0 = untrained)."""

    arch: str
    seed: int
    epochs: list[float]
    top1: list[float]


def _arch_colors(archs: Sequence[str]) -> dict[str, tuple[float, ...]]:
    palette = colormaps["tab10"]
    return {arch: palette(i % 10) for i, arch in enumerate(archs)}


def study_figure(
    panels: Sequence[MetricPanel],
    curves: Sequence[OnlineCurve],
    trends: Mapping[str, GaugTrends],
    archs: Sequence[str],
    path: str | os.PathLike,
    title: str,
) -> Path:
    """Write the study figure to ``path`` (atomically).

    Row 1: a bar per arch (mean over seeds) per metric, a dot per seed, dashed lines for the
    references; the y axis is zoomed on the values (bars do not start at 0). Row 2: online
    k-NN curves (colour = arch, line style = seed), then GAug mean variance and mean alpha
    per block against epoch (colour = block, line style = run).
    """
    cols = max(len(panels), 3)
    fig = new_figure(360 * cols, 760)
    grid = fig.add_gridspec(2, cols, hspace=0.45, wspace=0.3)
    colors = _arch_colors(archs)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        for x, arch in enumerate(archs):
            values = panel.per_arch.get(arch, [])
            if not values:
                continue
            ax.bar(x, float(np.mean(values)), color=colors[arch], alpha=0.5, width=0.6)
            jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else [0.0]
            ax.scatter(x + np.asarray(jitter), values, color="black", s=14, zorder=3)
        ref_colors = colormaps["Dark2"]
        for j, (name, value) in enumerate(panel.references.items()):
            ax.axhline(value, ls="--", lw=1, color=ref_colors(j % 8), label=name)
        shown = [v for vs in panel.per_arch.values() for v in vs] + list(panel.references.values())
        if shown:  # zoom on the values: differences of a point must stay visible
            low, high = min(shown), max(shown)
            margin = max(1.0, 0.15 * (high - low))
            ax.set_ylim(max(0.0, low - margin), high + margin)
        ax.set_xticks(range(len(archs)), archs, fontsize=8)
        ax.set_title(panel.label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if panel.references:
            ax.legend(fontsize=6, loc="lower right")
    seeds = sorted({curve.seed for curve in curves})
    ax = fig.add_subplot(grid[1, 0])
    for curve in curves:
        style = SEED_STYLES[seeds.index(curve.seed) % len(SEED_STYLES)]
        label = f"{curve.arch} seed {curve.seed}"
        ax.plot(
            curve.epochs, curve.top1, style, marker="o", ms=3, color=colors[curve.arch], label=label
        )
    ax.set_title("online k-NN: teacher 20-NN top-1 (%)", fontsize=9)
    ax.set_xlabel("epoch (completed)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=6, loc="best")
    ax_var, ax_alpha = fig.add_subplot(grid[1, 1]), fig.add_subplot(grid[1, 2])
    for r, (name, trend) in enumerate(trends.items()):
        blocks = trend.var_mean.shape[1]
        style = SEED_STYLES[r % len(SEED_STYLES)]
        for block in range(blocks):
            color = colormaps["viridis"](block / max(1, blocks - 1))
            label = name if block == 0 else None
            ax_var.plot(trend.epochs, trend.var_mean[:, block], style, color=color, label=label)
            ax_alpha.plot(trend.epochs, trend.alpha_mean[:, block], style, color=color)
    ax_var.set_title(
        "GAug mean variance per block (colour: block 0 dark .. last light)", fontsize=8
    )
    ax_alpha.set_title("GAug mean alpha per block", fontsize=8)
    for axis in (ax_var, ax_alpha):
        axis.set_xlabel(next(iter(trends.values())).x_label if trends else "epoch")
        axis.grid(alpha=0.3)
        if not trends:
            axis.text(
                0.5,
                0.5,
                "no LocAtViT run with GAug scalars",
                ha="center",
                transform=axis.transAxes,
                fontsize=8,
            )
    if trends:
        values = np.concatenate([t.var_mean[np.isfinite(t.var_mean)] for t in trends.values()])
        if values.size and values.min() > 0 and values.max() / values.min() > 10:
            ax_var.set_yscale("log")  # a collapse towards 0 shows over decades
        ax_var.legend(fontsize=6, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.08, top=0.9)
    return save_png(fig, path)
