"""Frozen-backbone semantic segmentation: two protocols, one evaluator.

Design: docs/architecture.md#evaluation-protocols.

The backbone's last-block patch tokens (before the final norm and PRR) form a (D, h, w)
feature map; a small head (1x1 conv to 512 channels, GroupNorm, GELU, 1x1 classifier) is
trained on it with AdamW, its logits upsampled bilinearly to the mask size. mIoU, mAcc and
aAcc are computed on each validation mask at its own resolution, with 255 ignored.

- ``--protocol fast`` (default): images squashed to a square ``image_size``, feature maps
  cached, no augmentation, GroupNorm(32), cosine schedule over epochs. A quick probe for
  our own A/B comparisons; its numbers are not comparable with the paper's.
- ``--protocol paper``: the public LocAtViT frozen-segmentation protocol. Head without
  conv bias, GroupNorm(1 group), weights normal(0, 0.01); AdamW lr 1e-3, wd 0.01; one-cycle
  schedule (25% linear warm-up, linear anneal; the lr only) over 20,000 iterations at batch
  32; training views rescaled into a (2048, 512) frame x [0.5, 2], 512 crops with no class
  over 75%, flips, photometric distortion (the backbone runs every iteration); test views
  short side 512, aspect kept, whole image. PASCAL Context-59 uses 520 / 480 crops.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dino_locat.checkpoint import plain_args
from dino_locat.data.segmentation import (
    IGNORE_INDEX,
    LAYOUTS,
    FashionMNISTScenes,
    PaperTestTransform,
    PaperTrainTransform,
    SegmentationFolder,
    SegmentationTransform,
    collate_keep_masks,
    detect_layout,
)
from dino_locat.distributed import sum_over_ranks
from dino_locat.evaluation.backbone import frozen_backbone
from dino_locat.evaluation.features import (
    FrozenBatches,
    feature_bytes,
    patch_feature_map,
    shard_dataset,
)
from dino_locat.evaluation.metrics import ConfusionMatrix, iou_table
from dino_locat.evaluation.options import (
    EvaluationInputError,
    add_backbone_args,
    add_run_args,
    check_positive,
    default_output_dir,
    resolve_device,
)
from dino_locat.evaluation.report import Report
from dino_locat.logging import Progress
from dino_locat.options import bool_flag
from dino_locat.schedules import cosine_schedule
from dino_locat.visualization.maps import display_images

PairTransform = Callable[[Any, Any], Any]
HIDDEN = 512
# Embedded default (Fashion-MNIST scenes, 64 px): one to two minutes for a ViT-S on 2 idle cores.
EMBEDDED_SCENES = (1000, 250)
EMBEDDED_EPOCHS = 20
FOLDER_EPOCHS = 40
SHOWN_PREDICTIONS = 4
PAPER_ITERATIONS = 20_000
# layout -> (training (long, short) frame, crop side, test (long, short) frame), as the paper's
# protocol sets them; every other layout (and the embedded scenes) uses the ADE20K sizes.
PAPER_SIZES = {
    "context": ((520, 520), 480, (4096, 520)),
    "default": ((2048, 512), 512, (2048, 512)),
}


class SegmentationHead(nn.Sequential):
    """1x1 conv (512 ch) + GroupNorm + GELU + 1x1 classifier on a (B, D, h, w) map."""

    def __init__(self, embed_dim: int, num_classes: int, hidden: int = HIDDEN) -> None:
        super().__init__(
            nn.Conv2d(embed_dim, hidden, kernel_size=1),
            nn.GroupNorm(32, hidden),
            nn.GELU(),
            nn.Conv2d(hidden, num_classes, kernel_size=1),
        )


class PaperSegmentationHead(nn.Sequential):
    """The paper protocol's head: 1x1 conv (512, no bias) + GroupNorm(1) + GELU + 1x1
    classifier, conv weights drawn from normal(0, 0.01)."""

    def __init__(self, embed_dim: int, num_classes: int, hidden: int = HIDDEN) -> None:
        super().__init__(
            nn.Conv2d(embed_dim, hidden, kernel_size=1, bias=False),
            nn.GroupNorm(1, hidden),
            nn.GELU(),
            nn.Conv2d(hidden, num_classes, kernel_size=1),
        )
        for conv in (self[0], self[3]):
            nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(self[3].bias)


def upsampled_logits(head: nn.Module, feature_map: Tensor, size: tuple[int, int]) -> Tensor:
    """Head logits, bilinearly upsampled from the patch grid to ``size`` (mask pixels)."""
    return F.interpolate(head(feature_map), size=size, mode="bilinear", align_corners=False)


def palette(num_classes: int) -> np.ndarray:
    """(C + 1, 3) uint8 colours: class c -> row c, ignore -> the last row (white)."""
    cmap = colormaps["tab20"]
    colours = [(0, 0, 0)] + [
        tuple(int(255 * v) for v in cmap(i % 20)[:3]) for i in range(1, num_classes)
    ]
    return np.array(colours + [(255, 255, 255)], dtype=np.uint8)


def colour_masks(mask: Tensor, colours: np.ndarray) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) uint8 picture; ignore pixels white."""
    labels = mask.cpu().numpy().astype(np.int64)
    labels = np.where(labels == IGNORE_INDEX, len(colours) - 1, labels)
    return colours[labels]


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    head: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    shown: int = SHOWN_PREDICTIONS,
) -> tuple[ConfusionMatrix, np.ndarray | None]:
    """Confusion matrix over the loader's masks, and a picture of the first predictions
    (rows of image | ground truth | prediction, at mask resolution)."""
    head.eval()
    confusion = ConfusionMatrix(num_classes, IGNORE_INDEX)
    colours = palette(num_classes)
    rows: list[np.ndarray] = []
    progress = Progress(loader, len(loader), header="segmentation eval")
    for images, masks in progress:
        features = patch_feature_map(model, images.to(device))
        for i, mask in enumerate(masks):
            logits = upsampled_logits(head, features[i : i + 1], tuple(mask.shape))
            prediction = logits.argmax(1)[0].cpu()
            confusion.update(prediction, mask)
            if len(rows) < shown:
                image = F.interpolate(images[i : i + 1].float(), size=tuple(mask.shape))
                picture = (display_images(image)[0] * 255).astype(np.uint8)
                rows.append(
                    np.concatenate(
                        [picture, colour_masks(mask, colours), colour_masks(prediction, colours)],
                        axis=1,
                    )
                )
        if progress.due:
            progress.log(*progress.rate())
    same_size = rows and all(r.shape == rows[0].shape for r in rows)
    grid = np.concatenate(rows, axis=0) if same_size else (rows[0] if rows else None)
    return confusion, grid


def train_segmentation_head(
    head: nn.Module,
    train: FrozenBatches,
    epochs: int,
    lr: float,
    weight_decay: float,
    report: Report,
) -> None:
    """AdamW on the head, cosine lr, cross-entropy on upsampled logits (255 ignored)."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = cosine_schedule(lr, 0.0, epochs, len(train))
    step = 0
    for epoch in range(epochs):
        head.train()
        progress = Progress(
            train.epoch(epoch), len(train), header=f"segmentation epoch {epoch + 1}/{epochs}"
        )
        for features, masks in progress:
            for group in optimizer.param_groups:
                group["lr"] = float(schedule[step])
            logits = upsampled_logits(head, features, tuple(masks.shape[-2:]))
            loss = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if progress.due:
                value = float(loss.detach())
                progress.log(*progress.rate(), loss=value, lr=float(schedule[step - 1]))
                report.scalar("train/loss", value, step)


def _forever(loader: DataLoader) -> Iterator[Any]:
    while True:
        yield from loader


def one_cycle(
    optimizer: torch.optim.Optimizer, lr: float, iterations: int
) -> torch.optim.lr_scheduler.OneCycleLR:
    """The paper protocol's schedule: lr / 25 rising linearly to ``lr`` over the first 25% of
    ``iterations``, then falling linearly to lr / 25e4 (torch's one-cycle defaults; the
    Adam betas are left alone)."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=lr,
        total_steps=iterations,
        pct_start=0.25,
        anneal_strategy="linear",
        cycle_momentum=False,
    )


def train_paper_head(
    model: nn.Module,
    head: nn.Module,
    loader: DataLoader,
    iterations: int,
    lr: float,
    weight_decay: float,
    device: torch.device,
    report: Report,
) -> None:
    """AdamW + one-cycle lr (25% linear warm-up from lr / 25, linear anneal) for
    ``iterations`` steps; the frozen backbone embeds every freshly augmented batch."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = one_cycle(optimizer, lr, iterations)
    head.train()
    progress = Progress(islice(_forever(loader), iterations), iterations, header="paper head")
    for step, (images, masks) in enumerate(progress, start=1):
        with torch.no_grad():
            features = patch_feature_map(model, images.to(device, non_blocking=True))
        masks = masks.to(device)
        logits = upsampled_logits(head, features, tuple(masks.shape[-2:]))
        loss = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        used_lr = schedule.get_last_lr()[0]
        schedule.step()
        if progress.due:
            value = float(loss.detach())
            progress.log(*progress.rate(), loss=value, lr=used_lr)
            report.scalar("train/loss", value, step)
            report.scalar("train/lr", used_lr, step)


def add_segmentation_data_args(parser: argparse.ArgumentParser) -> None:
    """Which segmentation data a dense evaluator reads (shared with Hummingbird)."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data_path",
        default=None,
        help="ADE20K (images/ + annotations/), Pascal VOC (JPEGImages/ + SegmentationClass/) "
        "or images/<split>/ + masks/<split>/; default: embedded Fashion-MNIST scenes",
    )
    data.add_argument("--layout", choices=LAYOUTS, default="auto", help="folder layout (auto)")
    data.add_argument("--train_split", default="train", help="train split name (train)")
    data.add_argument("--val_split", default="val", help="evaluation split name (val)")
    data.add_argument(
        "--num_classes", type=int, default=None, help="generic layout without classes.txt"
    )
    data.add_argument(
        "--train_scenes",
        type=int,
        default=EMBEDDED_SCENES[0],
        help="Fashion-MNIST scenes from the train split (%(default)s)",
    )
    data.add_argument(
        "--test_scenes",
        type=int,
        default=EMBEDDED_SCENES[1],
        help="Fashion-MNIST scenes from the test split (%(default)s)",
    )
    data.add_argument("--canvas_size", type=int, default=64, help="scene side in px (64)")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "Frozen-backbone semantic segmentation (linear-style head on patch tokens)",
        add_help=add_help,
    )
    add_backbone_args(parser, required=False, compilable=True, raw_pixels=True)
    add_run_args(parser, batch_size=32)
    add_segmentation_data_args(parser)
    head = parser.add_argument_group("head training")
    head.add_argument(
        "--protocol",
        choices=("fast", "paper"),
        default="fast",
        help="fast: squashed square images, cached features, our quick A/B probe; paper: "
        "the LocAtViT paper's protocol, comparable with its tables (default: fast)",
    )
    head.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"fast: default {EMBEDDED_EPOCHS} on the scenes, {FOLDER_EPOCHS} with --data_path",
    )
    head.add_argument(
        "--iterations",
        type=int,
        default=PAPER_ITERATIONS,
        help="paper: training iterations (%(default)s)",
    )
    head.add_argument(
        "--crop_size",
        type=int,
        default=None,
        help="paper: training crop side (512; 480 for PASCAL Context)",
    )
    head.add_argument(
        "--train_scale",
        type=int,
        nargs=2,
        default=None,
        metavar=("LONG", "SHORT"),
        help="paper: frame the training images are rescaled into, x [0.5, 2] "
        "(2048 512; 520 520 for PASCAL Context)",
    )
    head.add_argument(
        "--test_scale",
        type=int,
        nargs=2,
        default=None,
        metavar=("LONG", "SHORT"),
        help="paper: frame of the test images (2048 512; 4096 520 for PASCAL Context)",
    )
    head.add_argument("--lr", type=float, default=1e-3, help="AdamW peak lr (1e-3)")
    head.add_argument(
        "--weight_decay",
        type=float,
        default=None,
        help="AdamW decay (fast: 1e-4, paper: 0.01)",
    )
    head.add_argument(
        "--augment",
        type=bool_flag,
        default=False,
        help="fast: random horizontal flips; the backbone then runs every epoch (false)",
    )
    head.add_argument(
        "--cache_limit_gb",
        type=float,
        default=4.0,
        help="cache training feature maps in memory only below this size (4)",
    )
    return parser


def segmentation_datasets(
    args: argparse.Namespace, train_tf: PairTransform, val_tf: PairTransform
) -> tuple[Dataset, Dataset, list[str]]:
    """Train and evaluation datasets of ``add_segmentation_data_args``' flags, class names."""
    if args.data_path is None:
        common = {"canvas_size": args.canvas_size, "seed": args.seed}
        train = FashionMNISTScenes("train", args.train_scenes, transform=train_tf, **common)
        val = FashionMNISTScenes("test", args.test_scenes, transform=val_tf, **common)
        print(
            f"Fashion-MNIST scenes (embedded default; masks derived from item pixels): "
            f"{len(train)} train, {len(val)} test scenes of {args.canvas_size} px "
            "(--train_scenes/--test_scenes)",
            flush=True,
        )
        return train, val, list(train.classes)
    train = SegmentationFolder(
        args.data_path, args.train_split, args.layout, train_tf, args.num_classes
    )
    val = SegmentationFolder(args.data_path, args.val_split, args.layout, val_tf, args.num_classes)
    print(
        f"{train.layout} folder {args.data_path}: {len(train)} {args.train_split} and "
        f"{len(val)} {args.val_split} images, {len(train.classes)} classes",
        flush=True,
    )
    return train, val, list(train.classes)


def _fast_protocol(
    args: argparse.Namespace, device: torch.device, report: Report
) -> tuple[nn.Module, dict[str, Any], nn.Module, DataLoader, list[str], dict[str, Any]]:
    """Squashed square images, cached feature maps, cosine schedule over epochs."""
    embedded = args.data_path is None
    model, info = frozen_backbone(
        args, device, image_size=args.image_size or (args.canvas_size if embedded else None)
    )
    image_size = info["image_size"]
    epochs = args.epochs or (EMBEDDED_EPOCHS if embedded else FOLDER_EPOCHS)
    train_set, val_set, classes = segmentation_datasets(
        args,
        SegmentationTransform(image_size, train=args.augment),
        SegmentationTransform(image_size, train=False, keep_mask_size=True),
    )
    size = feature_bytes(model, train_set, patch_feature_map, device)
    cache = not args.augment and size <= args.cache_limit_gb * 2**30
    print(
        f"train feature maps {size / 2**30:.2f} GB: "
        f"{'cached in memory' if cache else 'recomputed every epoch'}",
        flush=True,
    )
    train = FrozenBatches(
        model,
        train_set,
        patch_feature_map,
        device,
        args.batch_size_per_gpu,
        args.num_workers,
        cache,
        seed=args.seed,
        header="train feature maps",
    )
    val_loader = DataLoader(
        shard_dataset(val_set),
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        collate_fn=collate_keep_masks,
    )
    head = SegmentationHead(info["embed_dim"], len(classes)).to(device)
    weight_decay = 1e-4 if args.weight_decay is None else args.weight_decay
    train_segmentation_head(head, train, epochs, args.lr, weight_decay, report)
    details = {"image_size": image_size, "epochs": epochs, "weight_decay": weight_decay}
    return model, info, head, val_loader, classes, details


def _paper_protocol(
    args: argparse.Namespace, device: torch.device, report: Report
) -> tuple[nn.Module, dict[str, Any], nn.Module, DataLoader, list[str], dict[str, Any]]:
    """The paper's augmentation, head, optimiser and schedule; whole-image test views."""
    layout = "default"
    if args.data_path is not None:
        layout = detect_layout(Path(args.data_path)) if args.layout == "auto" else args.layout
    train_scale, crop, test_scale = PAPER_SIZES.get(layout, PAPER_SIZES["default"])
    train_scale = tuple(args.train_scale or train_scale)
    test_scale = tuple(args.test_scale or test_scale)
    crop = args.crop_size or crop
    model, info = frozen_backbone(args, device, image_size=args.image_size or crop)
    if crop % info["patch_size"]:
        raise EvaluationInputError(
            f"--crop_size {crop} is not a multiple of the patch size {info['patch_size']}"
        )
    train_set, val_set, classes = segmentation_datasets(
        args, PaperTrainTransform(train_scale, crop), PaperTestTransform(test_scale)
    )
    batch = args.batch_size_per_gpu
    loader = DataLoader(
        train_set,
        batch_size=batch,
        shuffle=True,
        drop_last=len(train_set) >= batch,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(args.seed),
    )
    val_loader = DataLoader(
        shard_dataset(val_set),
        batch_size=1,
        num_workers=args.num_workers,
        collate_fn=collate_keep_masks,
    )
    head = PaperSegmentationHead(info["embed_dim"], len(classes)).to(device)
    weight_decay = 0.01 if args.weight_decay is None else args.weight_decay
    print(
        f"paper protocol: {args.iterations} iterations at batch {batch}, crops {crop} from a "
        f"{train_scale} frame x [0.5, 2], test frame {test_scale}, AdamW lr {args.lr} "
        f"wd {weight_decay}, one-cycle",
        flush=True,
    )
    train_paper_head(model, head, loader, args.iterations, args.lr, weight_decay, device, report)
    details = {
        "crop_size": crop,
        "train_scale": list(train_scale),
        "test_scale": list(test_scale),
        "iterations": args.iterations,
        "batch_size": batch,
        "weight_decay": weight_decay,
    }
    return model, info, head, val_loader, classes, details


def _comparable_with_paper(args: argparse.Namespace) -> bool:
    """Paper protocol with its defaults on real benchmark data (not the embedded scenes)."""
    parser = get_args_parser()
    sizes = ("iterations", "crop_size", "train_scale", "test_scale", "image_size", "lr")
    return (
        args.protocol == "paper"
        and args.data_path is not None
        and args.batch_size_per_gpu == 32
        and args.weight_decay in (None, 0.01)
        and all(getattr(args, name) == parser.get_default(name) for name in sizes)
    )


def run_segmentation(args: argparse.Namespace) -> dict[str, Any]:
    """Train the head on frozen patch tokens (``--protocol``), report mIoU, mAcc, aAcc (+ per
    class IoU) and a picture of predictions."""
    check_positive(
        args, "epochs", "iterations", "crop_size", "lr", "batch_size_per_gpu", "train_scenes"
    )
    check_positive(args, "test_scenes", "train_scale", "test_scale")
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    output_dir = default_output_dir(args, "segmentation")
    report = Report(output_dir, "segmentation")
    protocol = _paper_protocol if args.protocol == "paper" else _fast_protocol
    model, info, head, val_loader, classes, details = protocol(args, device, report)
    step = details.get("epochs") or details["iterations"]
    confusion, picture = evaluate_segmentation(model, head, val_loader, len(classes), device)
    confusion.counts = sum_over_ranks(confusion.counts)  # each rank scored its shard
    iou = confusion.iou()
    print(iou_table(iou, classes))
    metrics = {
        "mIoU": confusion.mean_iou(),
        "mAcc": confusion.mean_accuracy(),
        "aAcc": confusion.pixel_accuracy(),
    }
    print(
        f"{args.protocol} protocol: "
        + "  ".join(f"{name} {value:.2f}%" for name, value in metrics.items()),
        flush=True,
    )
    for name, value in metrics.items():
        report.scalar(f"val/{name}", value, step)
    if picture is not None:
        report.writer.add_image(
            "segmentation/image_truth_prediction", picture, global_step=step, dataformats="HWC"
        )
    head_path = report.save_checkpoint(
        {
            "head": head.state_dict(),
            "protocol": args.protocol,
            "classes": classes,
            "embed_dim": info["embed_dim"],
            "backbone": {
                k: info[k] for k in ("checkpoint", "checkpoint_key", "arch", "patch_size")
            },
            "image_size": info["image_size"],
            "args": plain_args(args),
        },
        output_dir / "segmentation_head.pth",
    )
    results = {
        "evaluation": "segmentation",
        "protocol": args.protocol,
        "comparable_with_paper": _comparable_with_paper(args),
        **{k: info[k] for k in ("checkpoint", "checkpoint_key", "arch", "epoch")},
        **details,
        "num_classes": len(classes),
        "ignore_index": IGNORE_INDEX,
        **metrics,
        "pixel_accuracy": metrics["aAcc"],
        "per_class_iou": {
            name: (None if value != value else 100.0 * value)
            for name, value in zip(classes, iou.tolist(), strict=True)
        },
        "head_file": str(head_path),
    }
    report.finish(results)
    return results
