"""The training-time hook: locality figures and GAug histograms into TensorBoard."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from dino_locat.visualization.locality_figures import locality_figures

FIGURE_TAG = "locality/{}"
HISTOGRAM_TAG = "locality/gaug_{}/block{:02d}"


def log_locality_figures(
    writer: SummaryWriter,
    model: torch.nn.Module,
    images: Tensor,
    step: int,
    threshold: float = 0.6,
    max_images: int = 4,
) -> None:
    """Log the CLS attention (all models), GAug bias and var/alpha figures (LocAtViT) and
    per-block var/alpha histograms for a fixed batch, so runs can be compared over epochs.

    The histograms are of this fixed batch in eval mode (training's own ``gaug/var/*``
    histograms are of the training crops). Only the first image gets GAug bias figures,
    to keep the event file small.
    """
    result = locality_figures(model, images[:max_images], threshold=threshold, bias_images=1)
    for name, figure in result.figures.items():
        writer.add_figure(FIGURE_TAG.format(name), figure, global_step=step, close=True)
    for block, values in enumerate(result.gaug or []):
        writer.add_histogram(HISTOGRAM_TAG.format("var", block), values["var"], global_step=step)
        writer.add_histogram(
            HISTOGRAM_TAG.format("alpha", block), values["alpha"], global_step=step
        )
    writer.flush()
