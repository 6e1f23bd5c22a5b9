"""The one schedule helper: linear warm-up, then a half-cosine, one value per iteration.

Every DINO schedule is an instance of it: learning rate (warm-up from 0, cosine to
``min_lr``), weight decay and teacher momentum (cosine, no warm-up), and the teacher
temperature (linear warm-up, then a "cosine" between two equal values, i.e. constant,
evaluated once per epoch with one iteration per epoch).
"""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: float = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """``epochs * niter_per_ep`` values.

    Warm-up: ``linspace(start_warmup_value, base_value, W)`` over the first
    W = ``round(warmup_epochs * niter_per_ep)`` iterations (both ends included; a fraction of
    an epoch lets a short run on a large set keep the same warm-up share). Then for
    i = 0 .. T-1 (T the remaining iterations):
    ``final + 0.5 * (base - final) * (1 + cos(pi * i / T))``.
    """
    total = epochs * niter_per_ep
    warmup = round(warmup_epochs * niter_per_ep)
    if total <= 0:
        raise ValueError(f"a schedule needs at least one iteration (epochs={epochs})")
    if warmup > total:
        raise ValueError(
            f"warm-up of {warmup_epochs} epochs is longer than the run ({epochs} epochs)"
        )
    ramp = np.linspace(start_warmup_value, base_value, warmup)
    steps = np.arange(total - warmup)
    cosine = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * steps / max(len(steps), 1))
    )
    return np.concatenate([ramp, cosine])
