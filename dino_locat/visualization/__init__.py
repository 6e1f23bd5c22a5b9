"""Figures of what LocAtViT's locality does: CLS attention, GAug bias, var/alpha trends."""

from dino_locat.visualization.locality_figures import (
    NO_GAUG_NOTE,
    LocalityFigures,
    locality_figures,
)
from dino_locat.visualization.tensorboard_logging import log_locality_figures

__all__ = ["NO_GAUG_NOTE", "LocalityFigures", "locality_figures", "log_locality_figures"]
