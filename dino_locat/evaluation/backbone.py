"""The frozen backbone an evaluator runs: loaded once, by the one checkpoint loader, or the
raw-pixel baseline in a backbone's shape (``--raw_pixels``), so that every evaluator scores
raw pixels through the same code path as a network."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino_locat.checkpoint import load_pretrained_backbone
from dino_locat.evaluation.options import EvaluationInputError
from dino_locat.models.compile import compile_blocks

# the evaluation transforms give RGB tensors (grey images are repeated over 3 channels)
PIXEL_CHANNELS = 3


class RawPixels(nn.Module):
    """Raw pixels as a frozen one-block backbone, nothing learned: its tokens are the image's
    non-overlapping ``patch_size`` patches (C * p * p values each, on the patch grid a
    network of that patch size has), its CLS their mean. With one patch covering the whole
    image, the CLS is the flattened image: the linear probe's raw-pixel baseline."""

    def __init__(self, patch_size: int, channels: int = PIXEL_CHANNELS) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = channels * patch_size**2

    def forward(self, images: Tensor) -> Tensor:
        return images

    def get_patch_tokens(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch pixels (B, h*w, C*p*p) in row-major grid order, and the grid (h, w)."""
        p = self.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        return F.unfold(images, kernel_size=p, stride=p).transpose(1, 2), grid

    def get_intermediate_layers(self, images: Tensor, n: int = 1) -> list[Tensor]:
        """The one block's tokens (B, 1 + h*w, C*p*p): the mean patch as CLS, then patches."""
        if n != 1:
            raise EvaluationInputError(f"--raw_pixels has one block, not the last {n}")
        tokens, _ = self.get_patch_tokens(images)
        return [torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)]


def raw_pixel_backbone(
    args: argparse.Namespace, device: torch.device, image_size: int | None = None
) -> tuple[RawPixels, dict[str, Any]]:
    """:class:`RawPixels` for ``--raw_pixels``: patches of ``--patch_size`` (default: the
    whole image) at ``--image_size`` (or the protocol's size), described as a backbone."""
    size = image_size or args.image_size
    if not size:
        raise EvaluationInputError(
            "--raw_pixels needs --image_size (the side images are resized to)"
        )
    patch = args.patch_size or size
    if size % patch:
        raise EvaluationInputError(
            f"--raw_pixels: --image_size {size} is not a multiple of --patch_size {patch}"
        )
    model = RawPixels(patch).to(device)
    print(
        f"backbone: raw pixels (the baseline; nothing loaded), {patch} x {patch} pixel patches "
        f"as tokens at {size} px",
        flush=True,
    )
    info = {
        "arch": "raw_pixels",
        "depth": 1,
        "patch_size": patch,
        "image_size": size,
        "embed_dim": model.embed_dim,
        "epoch": None,
        "checkpoint": None,
        "checkpoint_key": None,
        "weights_file": None,
        "pos_embed_interpolation": None,
    }
    return model, info


def frozen_backbone(
    args: argparse.Namespace, device: torch.device, image_size: int | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Backbone from ``--pretrained_weights`` (flags checked against it), or the raw pixels
    of ``--raw_pixels``, on ``device``.

    ``info`` also carries a fingerprint of the weights file (path, size, mtime), so that
    cached features are reused only for the very same checkpoint. ``--compile`` compiles
    each block (the numbers may differ from eager ones in the last float bits).
    """
    if getattr(args, "raw_pixels", False):
        if args.pretrained_weights:
            raise EvaluationInputError("--pretrained_weights and --raw_pixels exclude each other")
        return raw_pixel_backbone(args, device, image_size)
    if not args.pretrained_weights:
        raise EvaluationInputError("give --pretrained_weights CHECKPOINT (or --raw_pixels)")
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
