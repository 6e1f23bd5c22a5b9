"""Which flags a run may change when it resumes from its checkpoint.

Resuming replays an uninterrupted run only when everything that defines the weights, the
schedules and the data stream is unchanged. Flags that shape the weights can never change
(the checkpoint would not load); flags that define the schedules, the data or the
randomness may change only when the user says so (``--accept_changed_flags``), and the
change is then printed and kept in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# They shape the weights: a checkpoint trained with other values cannot be loaded.
SHAPE_KEYS = ("arch", "patch_size", "depth", "out_dim", "global_crops_size", "norm_last_layer")

# They define the schedules (rebuilt from the flags at every start), the data stream or
# the randomness: a change breaks the replay guarantee.
RECIPE_KEYS = (
    "epochs",
    "lr",
    "min_lr",
    "warmup_epochs",
    "weight_decay",
    "weight_decay_end",
    "momentum_teacher",
    "momentum_teacher_end",
    "teacher_temp",
    "warmup_teacher_temp",
    "warmup_teacher_temp_epochs",
    "batch_size_per_gpu",
    "world_size",
    "seed",
    "subset",
    "freeze_last_layer",
    "clip_grad",
    "drop_path_rate",
    "global_crops_scale",
    "local_crops_number",
    "local_crops_size",
    "local_crops_scale",
    "centering",
    "koleo_loss_weight",
    "pos_embed_interpolation",
    "compile",
)

# What checkpoints written before a flag existed were trained with.
LEGACY_VALUES: dict[str, Any] = {
    "pos_embed_interpolation": "timm",
    "centering": "centering",
    "koleo_loss_weight": 0.0,
    "compile": False,
}

FLAG_NAMES = {"world_size": "number of processes"}


def _describe(key: str) -> str:
    return FLAG_NAMES.get(key, f"--{key}")


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, list | tuple) and isinstance(new, list | tuple):
        return list(old) == list(new)
    return old == new


def changed_flags(
    stored: Mapping[str, Any], current: Mapping[str, Any], keys: tuple[str, ...]
) -> dict[str, tuple[Any, Any]]:
    """``{key: (checkpoint value, current value)}`` for the ``keys`` that differ.

    A key the checkpoint lacks counts as its legacy value, or as unchanged when it has none
    (checkpoints from before the key was recorded).
    """
    changes = {}
    for key in keys:
        if key not in stored and key not in LEGACY_VALUES:
            continue
        old = stored.get(key, LEGACY_VALUES.get(key))
        new = current.get(key)
        if not _same(old, new):
            changes[key] = (old, new)
    return changes


def describe_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{_describe(k)} {old!r} -> {new!r}" for k, (old, new) in changes.items())
