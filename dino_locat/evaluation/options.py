"""Flags shared by the three evaluators, defined once, and their command-line entry wrapper.

Names follow DINO's evaluation scripts (``--pretrained_weights --checkpoint_key --arch
--patch_size --batch_size_per_gpu --num_workers --data_path --output_dir``). The wrapper
joins the process group when started by torchrun/SLURM (several ranks share the work;
rank 0 alone prints and writes results) and turns user errors into one line naming the rank.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from contextlib import ExitStack, redirect_stdout
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dino_locat.distributed import DEFAULT_TIMEOUT_S, DistributedError, init_distributed
from dino_locat.errors import USER_ERRORS, fail
from dino_locat.models import ARCH_NAMES, POS_EMBED_INTERPOLATIONS


class EvaluationInputError(ValueError):
    """A flag or input that cannot be evaluated; the message names it."""


def add_backbone_args(
    parser: argparse.ArgumentParser,
    required: bool = True,
    weights: bool = True,
    input_size_help: str | None = None,
    compilable: bool = False,
    raw_pixels: bool = False,
) -> None:
    """Which backbone to load and at what size (``weights=False``: the checkpoint is implied,
    e.g. by a run folder, and only the checks and the image size are asked). With
    ``input_size_help`` the size is the protocol's, not the checkpoint's, and is also
    spelled ``--input_size`` as in that protocol's own tools; ``compilable``: the command
    runs the backbone through ``frozen_backbone``, which honours ``--compile``;
    ``raw_pixels``: ``--raw_pixels`` scores the raw-pixel baseline instead of a checkpoint
    (``frozen_backbone`` checks that exactly one of the two is given)."""
    group = parser.add_argument_group("backbone")
    if weights:
        group.add_argument(
            "--pretrained_weights",
            default=None,
            required=required,
            help="checkpoint to evaluate: our checkpoint.pth (or its output_dir), an official "
            "DINO checkpoint, a bare / timm backbone state_dict, or an export of "
            "eval/export.py (.safetensors or .pth)",
        )
    group.add_argument(
        "--checkpoint_key",
        default="teacher",
        help="which network of a training checkpoint: teacher (default) or student",
    )
    group.add_argument(
        "--arch",
        default=None,
        help=f"one of {', '.join(ARCH_NAMES)}; read from the checkpoint, so only needed "
        "(and checked against it) when you want to assert it",
    )
    group.add_argument(
        "--patch_size", type=int, default=None, help="read from the checkpoint; checked if given"
    )
    if input_size_help is None:
        group.add_argument(
            "--image_size",
            type=int,
            default=None,
            help="evaluation resolution (default: the checkpoint's global crop size)",
        )
    else:
        group.add_argument(
            "--input_size",
            "--image_size",
            dest="image_size",
            type=int,
            default=None,
            help=input_size_help,
        )
    group.add_argument(
        "--pos_embed_interpolation",
        choices=("auto", *POS_EMBED_INTERPOLATIONS),
        default="auto",
        help="how the position embedding is resampled to the evaluation size: timm (bicubic "
        "with antialias, as timm), dino (DINO's bicubic at scale (n + 0.1) / n0, no "
        "antialias); auto: the rule the checkpoint or export recorded, else dino for "
        "checkpoints trained with DINO's code, else timm",
    )
    if raw_pixels:
        group.add_argument(
            "--raw_pixels",
            action="store_true",
            help="the raw-pixel baseline instead of --pretrained_weights: images resized to "
            "--image_size; k-NN votes on the flattened image, the other evaluators see the "
            "pixels of each --patch_size patch as its token (default: the whole image, one "
            "token) and their mean as the CLS; nothing is loaded",
        )
    if compilable:
        group.add_argument(
            "--compile",
            action="store_true",
            help="torch.compile each transformer block (pays off on long extractions; the "
            "first batches of each input shape wait for the compiler)",
        )


def add_run_args(parser: argparse.ArgumentParser, batch_size: int) -> None:
    group = parser.add_argument_group("run")
    group.add_argument(
        "--output_dir",
        default=None,
        help="results.json and TensorBoard events (default: next to the checkpoint)",
    )
    group.add_argument(
        "--batch_size_per_gpu", type=int, default=batch_size, help="(default: %(default)s)"
    )
    group.add_argument(
        "--num_workers", type=int, default=2, help="data loader workers (default: 2)"
    )
    group.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)",
    )
    group.add_argument("--seed", type=int, default=0, help="subset and training seed (0)")
    group.add_argument(
        "--dist_timeout",
        type=float,
        default=None,
        help="under torchrun: seconds a rank waits for the others before failing "
        f"(default: $DINO_LOCAT_DIST_TIMEOUT_S, else {DEFAULT_TIMEOUT_S:g})",
    )
    launcher = parser.add_argument_group(
        "DINO launcher flags (accepted and ignored: ranks come from torchrun's environment)"
    )
    launcher.add_argument(
        "--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help="ignored"
    )
    launcher.add_argument("--dist_url", default=None, help="ignored")


def add_subset_args(parser: argparse.ArgumentParser, train: int, test: int) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data_path",
        default=None,
        help="ImageFolder root with train/ and val/ (ImageNet layout); default: the "
        "embedded Fashion-MNIST train/test split",
    )
    group.add_argument(
        "--train_subset",
        type=int,
        default=None,
        help=f"use N evenly spread training images, 0 = all (default: all with --data_path, "
        f"{train} of Fashion-MNIST)",
    )
    group.add_argument(
        "--test_subset",
        type=int,
        default=None,
        help=f"same for the evaluation split (default: all, or {test} of Fashion-MNIST)",
    )


def boolean_choices(values: list[bool] | None, default: list[bool]) -> list[bool]:
    """Deduplicated flag values in the given order (DINO-style true/false parsing)."""
    return list(dict.fromkeys(values if values else default))


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise EvaluationInputError(f"--device {name!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationInputError(f"--device {name}: CUDA is not available on this machine")
    return device


def default_output_dir(args: argparse.Namespace, name: str) -> Path:
    """``--output_dir``, else ``<checkpoint folder>/eval_<name>``."""
    if args.output_dir:
        return Path(args.output_dir)
    source = Path(args.pretrained_weights or ".")
    folder = source if source.is_dir() else source.parent
    return folder / f"eval_{name}"


def check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        values = value if isinstance(value, list) else [value]
        if any(v is not None and v <= 0 for v in values):
            raise EvaluationInputError(f"--{name} must be positive, got {value}")


def note_launcher_flags(args: argparse.Namespace) -> None:
    """Say that DINO's launcher flags are ignored, and why that is harmless."""
    for flag, name in (("--local_rank", "local_rank"), ("--dist_url", "dist_url")):
        value = getattr(args, name, None)
        if value is not None:
            print(
                f"note: {flag} {value} ignored: the rank, world size and address come from the "
                "environment that torchrun (or torch.distributed.launch, or SLURM) sets",
                flush=True,
            )


def run_cli(run: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> Any:
    """Run an evaluator on this process; a user error prints one clear line and exits with
    status 2 (:func:`dino_locat.errors.fail`).

    Under torchrun every rank runs ``run`` (the feature extraction is sharded), only rank 0
    prints to stdout; errors go to stderr prefixed with the rank that saw them.
    """
    where = "error"
    try:
        env, _ = init_distributed(timeout=getattr(args, "dist_timeout", None))
        if env.world_size > 1:
            where = f"error (rank {env.rank} of {env.world_size})"
        with ExitStack() as stack:
            if not env.is_main:
                stack.enter_context(redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            note_launcher_flags(args)
            if env.world_size > 1:
                print(f"{env.world_size} processes ({env.source}): extraction is sharded")
            return run(args)
    except USER_ERRORS as err:
        fail(err, where)
    except DistributedError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from err
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
