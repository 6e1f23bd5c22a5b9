"""Statistics over seeds, shared by the study's report and the sweep's k-NN curves, so that
"mean ± spread" means the same thing in every table we publish."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the spread is None for a single seed,
    which has none to report."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
