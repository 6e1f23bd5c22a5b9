"""Command-line value types shared by training and evaluation (below both, so that
evaluation never imports training)."""

from __future__ import annotations

import argparse


def bool_flag(value: str) -> bool:
    """DINO-style boolean flag values: ``--use_fp16 false``, ``--norm_last_layer 1``."""
    lowered = value.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")
