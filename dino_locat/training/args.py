"""Command-line flags of DINO pretraining (DINO's names and defaults) and the CPU preset.

Flags that the embedded Fashion-MNIST run changes default to ``None`` in the parser;
:func:`resolve_args` fills them in from DINO's defaults (with ``--data_path``) or from the
CPU preset (without), so any flag the user actually passes always wins.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from dino_locat.models import ARCH_NAMES, canonical_arch
from dino_locat.models.vision_transformer import POS_EMBED_INTERPOLATIONS
from dino_locat.options import bool_flag
from dino_locat.training.loss import CENTERINGS

# DINO's own defaults for the flags that the embedded preset may change.
DINO_DEFAULTS: dict[str, Any] = {
    "patch_size": 16,
    "out_dim": 65536,
    "global_crops_size": 224,
    "local_crops_size": 96,
    "local_crops_number": 8,
    "batch_size_per_gpu": 64,
    "epochs": 100,
    "warmup_epochs": 10,
    "momentum_teacher": 0.996,
    "momentum_teacher_end": 1.0,
    "teacher_temp": 0.04,
    "freeze_last_layer": 1,
    "drop_path_rate": 0.1,
    "lr": 0.0005,
    "saveckp_freq": 20,
    "num_workers": 10,
    "subset": 0,
    "vis_freq": 10,
    "knn_freq": 10,
    "knn_train_images": 10000,
    "knn_test_images": 2000,
}

# Sized so that `python -m dino_locat.training --arch locatvit_s` (full ViT-S depth) runs
# end to end in about 7 minutes on 2 CPU cores: Fashion-MNIST at 32 px with 8-px patches.
# The recipe is the one that kept ViT-S's teacher nearest its untrained network on held-out
# train queries (docs/sweep/round3/README.md#candidates-for-the-readme-main-job): global
# crops only, batch 32, out_dim 256, teacher temperature 0.02, lr 0.01, a constant teacher
# momentum of 0.99; the old multi-crop preset (4 local crops, out_dim 4096, batch 64) lost
# 11 points there. Add local crops with --local_crops_number.
EMBEDDED_PRESET: dict[str, Any] = {
    "patch_size": 8,
    "out_dim": 256,
    "global_crops_size": 32,
    "local_crops_size": 16,
    "local_crops_number": 0,
    "batch_size_per_gpu": 32,
    "epochs": 4,
    "warmup_epochs": 1,
    "momentum_teacher": 0.99,
    "momentum_teacher_end": 0.99,
    "teacher_temp": 0.02,
    "freeze_last_layer": 0,
    "drop_path_rate": 0.0,
    "lr": 0.01,
    "saveckp_freq": 0,
    "num_workers": 1,
    "subset": 2048,
    "vis_freq": 2,
    "knn_freq": 1,
    "knn_train_images": 700,
    "knn_test_images": 500,
}

# `--preset study`: the recipe of the backbone comparison (launch/study.py) for vit_t /
# locatvit_t, the best teacher and student curve of the preset sweep's second round, read on
# held-out train queries (run r_mconst in docs/sweep/README.md): the main job's recipe,
# without its locality figures.
STUDY_PRESET: dict[str, Any] = {**EMBEDDED_PRESET, "vis_freq": 0}

# `--preset long`: what more training buys. Round 3's base recipe (run lt_d28k in
# docs/sweep/round3/README.md: the main job's recipe, schedules scaled to the run) on the whole
# train split for 7 epochs, about 420,000 image views or two hours of locatvit_t on 2 CPU
# cores, the lr warm-up kept at 10% of the run; the online probe is eval/knn.py's 10,000 /
# 2,000 split, so its curve ends where the published evaluation starts. Run with its
# evaluators and baselines: `python launch/study.py --budget long --archs locatvit_t`.
LONG_PRESET: dict[str, Any] = {
    **EMBEDDED_PRESET,
    "subset": 0,
    "epochs": 7,
    "warmup_epochs": 0.7,
    "vis_freq": 1,
    "knn_train_images": 10000,
    "knn_test_images": 2000,
}

PRESETS: dict[str, dict[str, Any]] = {
    "main": EMBEDDED_PRESET,
    "study": STUDY_PRESET,
    "long": LONG_PRESET,
}


def _preset_help(name: str, text: str) -> str:
    """Help text quoting DINO's default and each preset's own value for ``name``."""
    presets = ", ".join(f"{preset} {values[name]}" for preset, values in PRESETS.items())
    return f"{text} (default: {DINO_DEFAULTS[name]}; without --data_path, --preset {presets})"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """DINO's flags (same names and meanings), plus crop sizes, depth, subset, logging."""
    parser = argparse.ArgumentParser("DINO pretraining of ViT / LocAtViT", add_help=add_help)
    model = parser.add_argument_group("model")
    model.add_argument(
        "--arch", default="locatvit_s", type=str, help=f"one of {', '.join(ARCH_NAMES)}"
    )
    model.add_argument(
        "--patch_size", type=int, help=_preset_help("patch_size", "patch size in pixels")
    )
    model.add_argument(
        "--depth", type=int, default=None, help="number of blocks (default: the arch's 12)"
    )
    model.add_argument(
        "--out_dim", type=int, help=_preset_help("out_dim", "DINO head output size K")
    )
    model.add_argument(
        "--norm_last_layer",
        type=bool_flag,
        default=True,
        help="weight-normalise the head's last layer with fixed g (default: true)",
    )
    model.add_argument(
        "--momentum_teacher",
        type=float,
        help=_preset_help(
            "momentum_teacher", "teacher EMA momentum at the first step, cosine to the end value"
        ),
    )
    model.add_argument(
        "--momentum_teacher_end",
        type=float,
        help=_preset_help(
            "momentum_teacher_end", "teacher EMA momentum at the last step (DINO: 1.0)"
        ),
    )
    model.add_argument(
        "--pos_embed_interpolation",
        choices=POS_EMBED_INTERPOLATIONS,
        default="dino",
        help="how the position embedding is resampled for crops of another size than the "
        "global crops: dino (DINO's rule: bicubic, scale factor (n + 0.1) / n0, no "
        "antialias) or timm (bicubic with antialias); recorded in the checkpoint, and the "
        "evaluators follow it (default: dino)",
    )
    model.add_argument(
        "--drop_path_rate", type=float, help=_preset_help("drop_path_rate", "stochastic depth")
    )
    model.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each transformer block of student and teacher (checkpoints "
        "keep plain keys; a compiled run resumes exactly like an eager one)",
    )

    temp = parser.add_argument_group("teacher temperature")
    temp.add_argument(
        "--warmup_teacher_temp", type=float, default=0.04, help="start of the warm-up (0.04)"
    )
    temp.add_argument(
        "--teacher_temp", type=float, help=_preset_help("teacher_temp", "after the warm-up")
    )
    temp.add_argument(
        "--warmup_teacher_temp_epochs", type=int, default=0, help="warm-up epochs (0)"
    )

    dinov2 = parser.add_argument_group("DINOv2 options (off by default: the step stays DINO's)")
    dinov2.add_argument(
        "--centering",
        choices=CENTERINGS,
        default="centering",
        help="teacher targets: centering (DINO's EMA centre + softmax) or sinkhorn_knopp "
        "(DINOv2's 3 Sinkhorn-Knopp iterations over the global batch) (default: centering)",
    )
    dinov2.add_argument(
        "--koleo_loss_weight",
        type=float,
        default=0.0,
        help="weight of DINOv2's KoLeo regulariser on the student's CLS embedding of each "
        "global crop, per process (DINOv2: 0.1; default: 0 = off)",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument(
        "--use_fp16",
        type=bool_flag,
        default=True,
        help="fp16 autocast + grad scaler on CUDA (default: true; CPU runs fp32)",
    )
    optim.add_argument(
        "--weight_decay", type=float, default=0.04, help="initial weight decay (0.04)"
    )
    optim.add_argument(
        "--weight_decay_end", type=float, default=0.4, help="final weight decay (0.4)"
    )
    optim.add_argument(
        "--clip_grad",
        type=float,
        default=3.0,
        help="max L2 norm per parameter tensor, 0 disables (3.0)",
    )
    optim.add_argument(
        "--batch_size_per_gpu",
        type=int,
        help=_preset_help("batch_size_per_gpu", "images per process and step"),
    )
    optim.add_argument("--epochs", type=int, help=_preset_help("epochs", "training epochs"))
    optim.add_argument(
        "--freeze_last_layer",
        type=int,
        help=_preset_help("freeze_last_layer", "epochs with the head's last layer frozen"),
    )
    optim.add_argument(
        "--lr",
        type=float,
        help=_preset_help("lr", "peak learning rate at a total batch of 256 (scaled linearly)"),
    )
    optim.add_argument(
        "--warmup_epochs",
        type=float,
        help=_preset_help("warmup_epochs", "linear lr warm-up in epochs (fractions allowed)"),
    )
    optim.add_argument("--min_lr", type=float, default=1e-6, help="final learning rate (1e-6)")
    optim.add_argument("--optimizer", default="adamw", choices=["adamw"], help="only AdamW")

    crops = parser.add_argument_group("multi-crop")
    crops.add_argument(
        "--global_crops_scale",
        type=float,
        nargs=2,
        default=(0.4, 1.0),
        help="area range of the global crops (0.4 1.0)",
    )
    crops.add_argument(
        "--local_crops_number",
        type=int,
        help=_preset_help("local_crops_number", "number of local crops"),
    )
    crops.add_argument(
        "--local_crops_scale",
        type=float,
        nargs=2,
        default=(0.05, 0.4),
        help="area range of the local crops (0.05 0.4)",
    )
    crops.add_argument(
        "--global_crops_size",
        type=int,
        help=_preset_help("global_crops_size", "global crop side in px"),
    )
    crops.add_argument(
        "--local_crops_size",
        type=int,
        help=_preset_help("local_crops_size", "local crop side in px"),
    )

    misc = parser.add_argument_group("data, output, logging")
    misc.add_argument(
        "--data_path",
        type=str,
        default=None,
        help="ImageFolder root (class sub-folders); default: embedded Fashion-MNIST",
    )
    misc.add_argument(
        "--subset",
        type=int,
        help=_preset_help("subset", "train on N evenly spread images, 0 = all"),
    )
    misc.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="main",
        help="which CPU preset fills unset flags without --data_path: main (the README job), "
        "study (the vit_t / locatvit_t comparison of launch/study.py) or long (about two "
        "hours of locatvit_t on the whole train split) (default: main)",
    )
    misc.add_argument(
        "--skip_corrupt", action="store_true", help="skip (and count) unreadable images"
    )
    misc.add_argument(
        "--output_dir",
        type=str,
        default=None,
        help="checkpoints and logs (default: output/dino_<arch>); auto-resumes from it",
    )
    misc.add_argument(
        "--saveckp_freq",
        type=int,
        help=_preset_help("saveckp_freq", "also keep checkpointNNNN.pth every N epochs, 0 = never"),
    )
    misc.add_argument(
        "--accept_changed_flags",
        action="store_true",
        help="resume even though schedule- or data-defining flags (--epochs, --lr, --seed, "
        "batch size, number of processes, ...) differ from the checkpoint's; the changes are "
        "printed and recorded, and the run no longer replays an uninterrupted one",
    )
    misc.add_argument("--seed", type=int, default=0, help="random seed (0)")
    misc.add_argument(
        "--num_workers",
        type=int,
        help=_preset_help("num_workers", "data loader workers per process"),
    )
    misc.add_argument(
        "--print_freq", type=int, default=10, help="console and TensorBoard every N steps (10)"
    )
    misc.add_argument(
        "--vis_freq",
        type=int,
        help=_preset_help("vis_freq", "locality figures in TensorBoard every N epochs, 0 = never"),
    )
    knn = parser.add_argument_group("online k-NN (teacher and student, 20-NN top-1)")
    knn.add_argument(
        "--knn_freq",
        type=int,
        help=_preset_help(
            "knn_freq",
            "evaluate before the first step and every N epochs, 0 = never; with --data_path "
            "only when --knn_data_path is given",
        ),
    )
    knn.add_argument(
        "--knn_data_path",
        type=str,
        default=None,
        help="folder with train/ and val/ class folders for the online k-NN (with --data_path)",
    )
    knn.add_argument(
        "--knn_train_images",
        type=int,
        help=_preset_help("knn_train_images", "k-NN bank size (train images, 0 = all)"),
    )
    knn.add_argument(
        "--knn_test_images",
        type=int,
        help=_preset_help("knn_test_images", "k-NN queries (test images, 0 = all)"),
    )
    knn.add_argument(
        "--knn_queries",
        choices=("test", "train"),
        default="test",
        help="where the queries come from: the test split (val/), or held-out train images "
        "outside the bank (and, on the embedded data, outside the pretraining subset), so "
        "that choosing a recipe on the curve never looks at the test split (default: test)",
    )
    return parser


def resolve_args(args: argparse.Namespace) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Fill unset flags (DINO defaults with --data_path, the preset without) and check them.

    Returns the completed copy and the values taken from the preset (for the start-up log).
    """
    args = argparse.Namespace(**vars(args))
    if args.data_path and args.preset != "main":
        raise ValueError(
            f"--preset {args.preset} sizes the embedded Fashion-MNIST run; with --data_path "
            "DINO's defaults apply (pass the flags you want instead)"
        )
    defaults = DINO_DEFAULTS if args.data_path else PRESETS[args.preset]
    chosen = {}
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
            chosen[name] = value
    try:
        args.arch = canonical_arch(args.arch)
    except ValueError as err:
        raise ValueError(f"--arch: {err}") from err
    if args.output_dir is None:
        args.output_dir = f"output/dino_{args.arch}"
    args.global_crops_scale = list(args.global_crops_scale)
    args.local_crops_scale = list(args.local_crops_scale)
    check_args(args)
    return args, (chosen if not args.data_path else {})


def check_args(args: argparse.Namespace) -> None:
    """Reject inconsistent flags up front, naming the flag."""
    for name in ("global_crops_size", "local_crops_size"):
        size = getattr(args, name)
        if size <= 0 or size % args.patch_size:
            raise ValueError(
                f"--{name} {size} must be a positive multiple of --patch_size {args.patch_size}"
            )
    if args.global_crops_size // args.patch_size < 2:
        raise ValueError("--global_crops_size must span at least 2 patches")
    positive = ("out_dim", "batch_size_per_gpu", "epochs", "print_freq")
    for name in positive:
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in (
        "local_crops_number",
        "warmup_epochs",
        "freeze_last_layer",
        "num_workers",
        "saveckp_freq",
        "subset",
        "vis_freq",
        "warmup_teacher_temp_epochs",
        "seed",
        "knn_freq",
        "knn_train_images",
        "knn_test_images",
    ):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("momentum_teacher", "momentum_teacher_end"):
        if not 0 <= getattr(args, name) <= 1:
            raise ValueError(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    for name in ("lr", "teacher_temp", "warmup_teacher_temp"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name} must be a positive number, got {value}")
    for name in (
        "min_lr",
        "weight_decay",
        "weight_decay_end",
        "clip_grad",
        "koleo_loss_weight",
        "drop_path_rate",
    ):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            hint = " (0 disables clipping)" if name == "clip_grad" else ""
            raise ValueError(f"--{name} must be >= 0{hint}, got {value}")
    if args.drop_path_rate >= 1:
        raise ValueError(f"--drop_path_rate must be below 1, got {args.drop_path_rate}")
    if args.koleo_loss_weight > 0 and args.batch_size_per_gpu < 2:
        raise ValueError(
            "--koleo_loss_weight needs at least 2 images per process to find neighbours; "
            f"raise --batch_size_per_gpu (now {args.batch_size_per_gpu})"
        )
    if args.knn_data_path is not None:
        for split in ("train", "val"):
            if not (Path(args.knn_data_path) / split).is_dir():
                raise ValueError(
                    f"--knn_data_path {args.knn_data_path} has no {split}/ folder (expected "
                    "train/<class>/*.jpg and val/<class>/*.jpg)"
                )
    if args.warmup_epochs > args.epochs:
        raise ValueError(f"--warmup_epochs {args.warmup_epochs} exceeds --epochs {args.epochs}")
    for name in ("global_crops_scale", "local_crops_scale"):
        low, high = getattr(args, name)
        if not 0 < low <= high <= 1:
            raise ValueError(f"--{name} must satisfy 0 < low <= high <= 1, got {low} {high}")
