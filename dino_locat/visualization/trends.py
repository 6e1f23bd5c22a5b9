"""Does GAug collapse or saturate? Mean var and alpha per block against epoch.

Two sources give the same figure: a run's checkpoints (the teacher backbone is run on a
fixed image batch under ``recording_gaug``) or the per-block GAug scalars training wrote
to TensorBoard. Variance collapsing to 0 means no locality bias reach; growing to the cap
``c`` means a flat (non-local) bias; alpha falling to 0 switches the bias off.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor

from dino_locat.checkpoint import CheckpointError, load_pretrained_backbone
from dino_locat.logging import Progress
from dino_locat.visualization.figures import (
    SUMMARY_SIZE_PX,
    atomic_write,
    new_figure,
    save_png,
    summary_layout,
    title_band,
    variance_axis,
)
from dino_locat.visualization.maps import gaug_values

CHECKPOINT_NAME = re.compile(r"^checkpoint(\d+)?\.pth$")
BLOCK_IN_TAG = re.compile(r"block[_/]?(\d+)")
STAT_IN_TAG = re.compile(r"(?:^|[^a-z])(var|alpha)(?:[^a-z]|$)")
LOSS_TAG, EPOCH_TAG = "train/loss", "epoch/train_loss"


@dataclass
class GaugTrends:
    """Mean var and alpha, (len(epochs), blocks) each, and where they came from."""

    epochs: list[float]
    var_mean: np.ndarray
    alpha_mean: np.ndarray
    source: str
    cap: float | None = None
    x_label: str = "epoch (completed)"

    def to_json(self, max_points: int | None = None) -> dict[str, Any]:
        """The numbers as JSON (a block missing at an epoch as null); with ``max_points``,
        evenly spaced rows, first and last kept, so a record of a long run stays small."""
        rows = np.arange(len(self.epochs))
        if max_points is not None and len(rows) > max_points:
            rows = np.unique(np.linspace(0, len(rows) - 1, max_points).round().astype(int))
        return {
            "source": self.source,
            "epochs": [float(self.epochs[r]) for r in rows],
            "x_label": self.x_label,
            "var_mean": _json_table(self.var_mean[rows]),
            "alpha_mean": _json_table(self.alpha_mean[rows]),
            "cap": self.cap,
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> GaugTrends:
        """The trends :meth:`to_json` wrote (null read back as NaN)."""

        def table(rows: list[list[float | None]]) -> np.ndarray:
            return np.array([[np.nan if v is None else v for v in row] for row in rows], float)

        return cls(
            list(record["epochs"]),
            table(record["var_mean"]),
            table(record["alpha_mean"]),
            record["source"],
            record.get("cap"),
            record.get("x_label", "epoch (completed)"),
        )


def checkpoint_files(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpointNNNN.pth`` files and ``checkpoint.pth`` of a run, numbered ones first."""
    folder = Path(output_dir)
    files = (
        [p for p in folder.iterdir() if CHECKPOINT_NAME.match(p.name)] if folder.is_dir() else []
    )
    return sorted(files, key=lambda p: (p.name == "checkpoint.pth", p.name))


def trends_from_checkpoints(
    output_dir: str | os.PathLike,
    images: Callable[[int], Tensor],
    arch: str | None = None,
    patch_size: int | None = None,
    checkpoint_key: str = "teacher",
    device: str | torch.device = "cpu",
    pos_embed_interpolation: str = "auto",
) -> GaugTrends:
    """Run each checkpoint's backbone on one fixed batch and average var/alpha per block.

    ``images(size)`` gives the batch at an image size; it is called once, with the first
    checkpoint's training crop size. The x value is the checkpoint's ``epoch`` (epochs
    completed); ``checkpoint.pth`` repeating a numbered checkpoint's epoch is read once.
    """
    files = checkpoint_files(output_dir)
    if not files:
        raise FileNotFoundError(f"no checkpoint*.pth files in {output_dir}")
    by_epoch: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    cap, batch = None, None
    progress = Progress(files, len(files), header="[gaug_trends] checkpoints", print_freq=1)
    for path in progress:
        model, info = load_pretrained_backbone(
            path, arch, patch_size, checkpoint_key, pos_embed_interpolation=pos_embed_interpolation
        )
        epoch = info["epoch"]
        if epoch is None:
            raise CheckpointError(f"{path} has no 'epoch' entry: not a training checkpoint")
        if not model.locality:
            raise ValueError(f"{path} holds a plain ViT: it has no GAug var/alpha to plot")
        if epoch not in by_epoch:
            if batch is None:
                batch = images(info["image_size"]).to(device)
            values = gaug_values(model.to(device), batch)
            by_epoch[epoch] = (
                np.array([v["var"].mean() for v in values]),
                np.array([v["alpha"].mean() for v in values]),
            )
            cap = model.blocks[0].attn.gaug.cap
        progress.log(*progress.rate(), file=path.name, epoch=epoch)
    epochs = sorted(by_epoch)
    return GaugTrends(
        epochs,
        np.stack([by_epoch[e][0] for e in epochs]),
        np.stack([by_epoch[e][1] for e in epochs]),
        f"checkpoints in {output_dir}, {checkpoint_key} on {len(batch)} fixed images",
        cap,
    )


def event_dirs(log_dir: Path) -> list[Path]:
    """The folders under ``log_dir`` that hold TensorBoard event files."""
    return sorted({p.parent for p in log_dir.rglob("events.out.tfevents.*")})


def _iterations_per_epoch(steps: dict[str, list[int]]) -> int | None:
    """Iterations per epoch of a run that logs ``train/loss`` every iteration and
    ``epoch/train_loss`` once per epoch, or None when that cannot be read off exactly."""
    loss, epochs = steps.get(LOSS_TAG), steps.get(EPOCH_TAG)
    if not loss or not epochs:
        return None
    total, completed = max(loss) + 1, max(epochs) + 1
    return total // completed if total % completed == 0 else None


def trends_from_tensorboard(log_dir: str | os.PathLike) -> GaugTrends:
    """Per-block GAug scalars from a run's event files.

    A scalar counts when its tag names ``var`` or ``alpha`` as a word and ``block<N>``
    (training logs ``gaug/var_mean/block03``). Training logs them at iteration steps;
    they are put on the epoch axis (step / iterations per epoch) when the run's loss
    scalars tell the iterations per epoch, else left as iterations.
    """
    series: dict[tuple[str, int], dict[int, float]] = {}
    steps: dict[str, list[int]] = {}
    for folder in event_dirs(Path(log_dir)):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if tag in (LOSS_TAG, EPOCH_TAG):
                steps.setdefault(tag, []).extend(e.step for e in events.Scalars(tag))
            block, stat = BLOCK_IN_TAG.search(tag), STAT_IN_TAG.search(tag.lower())
            if block is None or stat is None:
                continue
            values = series.setdefault((stat.group(1), int(block.group(1))), {})
            values.update({event.step: event.value for event in events.Scalars(tag)})
    if not series:
        raise FileNotFoundError(
            f"no per-block GAug var/alpha scalars in TensorBoard event files under {log_dir}"
        )
    blocks = sorted({b for _, b in series})
    logged = sorted({s for values in series.values() for s in values})

    def table(stat: str) -> np.ndarray:
        return np.array(
            [[series.get((stat, b), {}).get(s, np.nan) for b in blocks] for s in logged]
        )

    per_epoch = _iterations_per_epoch(steps)
    x, x_label = logged, "training iteration"
    if per_epoch:
        x, x_label = [s / per_epoch for s in logged], f"epoch (iteration / {per_epoch})"
    source = f"TensorBoard scalars in {log_dir}"
    return GaugTrends(x, table("var"), table("alpha"), source, x_label=x_label)


def trends_figure(trends: GaugTrends, title: str) -> Figure:
    """Two panels (mean var, mean alpha) with one line per block against epoch."""
    fig = new_figure(*SUMMARY_SIZE_PX)
    title_band(fig, title, SUMMARY_SIZE_PX[0])
    ax_var, ax_alpha = fig.subplots(1, 2)
    summary_layout(fig)
    num_blocks = trends.var_mean.shape[1]
    colors = [_block_color(b, num_blocks) for b in range(num_blocks)]
    for block in range(num_blocks):
        for ax, table in ((ax_var, trends.var_mean), (ax_alpha, trends.alpha_mean)):
            ax.plot(
                trends.epochs,
                table[:, block],
                marker="o",
                markersize=3,
                color=colors[block],
                label=f"block {block}",
            )
    if trends.cap is not None:
        ax_var.axhline(trends.cap, color="red", linestyle="--", linewidth=1, label="cap c")
    variance_axis(ax_var, trends.cap, float(np.nanmin(trends.var_mean)))
    ax_var.set_ylabel("mean variance (patches²)")
    ax_alpha.set_ylabel("mean alpha")
    ax_alpha.set_ylim(0.0, 1.2 * max(float(np.nanmax(trends.alpha_mean)), 1e-3))
    for ax in (ax_var, ax_alpha):
        ax.set_xlabel(trends.x_label)
        ax.legend(fontsize=6, ncol=2, loc="best")
    return fig


def _block_color(block: int, num_blocks: int) -> tuple[float, ...]:
    return colormaps["viridis"](block / max(1, num_blocks - 1))


def _json_table(table: np.ndarray) -> list[list[float | None]]:
    """Rows of floats, with a block missing at an epoch (NaN) as null."""
    return [[None if np.isnan(v) else float(v) for v in row] for row in table]


def write_trends(trends: GaugTrends, output_dir: str | os.PathLike) -> list[Path]:
    """``gaug_trends.png`` and the same numbers as ``gaug_trends.json``."""
    output_dir = Path(output_dir)
    title = f"GAug: collapse or saturate? Mean var / alpha per block vs epoch ({trends.source})"
    figure = save_png(trends_figure(trends, title), output_dir / "gaug_trends.png")
    text = json.dumps(trends.to_json(), indent=1).encode()
    numbers = atomic_write(output_dir / "gaug_trends.json", lambda handle: handle.write(text))
    return [figure, numbers]
