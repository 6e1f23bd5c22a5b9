"""The frozen backbone an evaluator runs: loaded once, by the one checkpoint loader."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_locat.checkpoint import load_pretrained_backbone
from dino_locat.models.compile import compile_blocks


def frozen_backbone(
    args: argparse.Namespace, device: torch.device, image_size: int | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Backbone from ``--pretrained_weights`` (flags checked against it), on ``device``.

    ``info`` also carries a fingerprint of the weights file (path, size, mtime), so that
    cached features are reused only for the very same checkpoint. ``--compile`` compiles
    each block (the numbers may differ from eager ones in the last float bits).
    """
    model, info = load_pretrained_backbone(
        args.pretrained_weights,
        arch=args.arch,
        patch_size=args.patch_size,
        checkpoint_key=args.checkpoint_key,
        image_size=image_size or args.image_size,
        pos_embed_interpolation=args.pos_embed_interpolation,
    )
    stat = Path(info["checkpoint"]).stat()
    info["weights_file"] = [str(Path(info["checkpoint"]).resolve()), stat.st_size, stat.st_mtime_ns]
    epoch = "" if info["epoch"] is None else f", epoch {info['epoch']}"
    key = "" if info["checkpoint_key"] is None else f" ({info['checkpoint_key']})"
    print(
        f"backbone: {info['arch']} depth {info['depth']}, patch {info['patch_size']}, "
        f"evaluated at {info['image_size']} px (position embedding resampled as "
        f"{info['pos_embed_interpolation']}), from {info['checkpoint']}{key}{epoch}",
        flush=True,
    )
    model = model.to(device)
    if getattr(args, "compile", False):
        print(f"--compile: {compile_blocks(model)} blocks compiled with torch.compile", flush=True)
    return model, info
