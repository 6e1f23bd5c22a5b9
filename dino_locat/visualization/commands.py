"""What ``eval/visualize.py`` and ``eval/gaug_trends.py`` run: load, compute, write PNGs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from dino_locat.checkpoint import load_pretrained_backbone
from dino_locat.visualization.figures import save_png
from dino_locat.visualization.inputs import load_images
from dino_locat.visualization.locality_figures import locality_figures
from dino_locat.visualization.maps import Patch
from dino_locat.visualization.trends import (
    trends_from_checkpoints,
    trends_from_tensorboard,
    write_trends,
)


def visualize_checkpoint(
    pretrained_weights: str | os.PathLike,
    output_dir: str | os.PathLike,
    images: Sequence[str | os.PathLike] | None = None,
    num_images: int = 4,
    data_path: str | None = None,
    image_size: int | None = None,
    arch: str | None = None,
    patch_size: int | None = None,
    checkpoint_key: str = "teacher",
    threshold: float | None = None,
    query_patches: Sequence[Patch] | None = None,
    bias_images: int | None = 1,
    device: str = "cpu",
    pos_embed_interpolation: str = "auto",
) -> list[Path]:
    """Write the locality PNGs of a checkpoint's backbone for image files or the test split.

    ``image_size`` defaults to the training crop size stored in the checkpoint; GAug bias
    figures are made for the first ``bias_images`` images (None: all).
    """
    model, info = load_pretrained_backbone(
        pretrained_weights, arch, patch_size, checkpoint_key, image_size, pos_embed_interpolation
    )
    batch = load_images(images, num_images, info["image_size"], data_path)
    result = locality_figures(
        model.to(device), batch, threshold=threshold, queries=query_patches, bias_images=bias_images
    )
    written = [
        save_png(fig, Path(output_dir) / f"{name}.png") for name, fig in result.figures.items()
    ]
    for path in written:
        print(f"[visualize] wrote {path}")
    return written


def gaug_cap(
    path: Path, arch: str | None, patch_size: int | None, checkpoint_key: str
) -> float | None:
    """The variance cap c of a run's model (for the trends plot), None for a plain ViT."""
    model, _ = load_pretrained_backbone(path, arch, patch_size, checkpoint_key)
    return model.blocks[0].attn.gaug.cap if model.locality else None


def plot_gaug_trends(
    run_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    source: str = "auto",
    images: Sequence[str | os.PathLike] | None = None,
    num_images: int = 16,
    data_path: str | None = None,
    image_size: int | None = None,
    arch: str | None = None,
    patch_size: int | None = None,
    checkpoint_key: str = "teacher",
    device: str = "cpu",
    pos_embed_interpolation: str = "auto",
) -> list[Path]:
    """Plot mean var/alpha per block against epoch for a run (``gaug_trends.png/.json``).

    ``source``: ``checkpoints``, ``tensorboard`` or ``auto`` (TensorBoard when the run's
    event files hold per-block GAug scalars, else its checkpoints).
    """
    if source not in ("auto", "checkpoints", "tensorboard"):
        raise ValueError(f"--source must be auto, checkpoints or tensorboard, got {source!r}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    trends = None
    if source != "checkpoints":
        try:
            trends = trends_from_tensorboard(run_dir)
        except FileNotFoundError:
            if source == "tensorboard":
                raise
        else:
            if (run_dir / "checkpoint.pth").is_file():
                trends.cap = gaug_cap(run_dir / "checkpoint.pth", arch, patch_size, checkpoint_key)
    if trends is None:

        def batch(native_size: int) -> torch.Tensor:
            return load_images(images, num_images, image_size or native_size, data_path)

        trends = trends_from_checkpoints(
            run_dir, batch, arch, patch_size, checkpoint_key, device, pos_embed_interpolation
        )
    written = write_trends(trends, output_dir)
    for path in written:
        print(f"[gaug_trends] wrote {path}")
    return written
