"""Hummingbird dense nearest-neighbour retrieval (Balazevic et al., NeurIPS 2023).

Design: docs/architecture.md#evaluation-protocols.

No head is trained: the frozen backbone's last-block patch tokens (before the final norm
and PRR, the segmentation probe's tokens) of augmented training images (224 px; the
embedded 64-px scenes keep their size) form a memory of L2-normalised patch features, each
with a soft label (the fraction of its labelled pixels in each class). Every validation
patch takes its k = 30 nearest memory patches (exact inner product, faiss), weights them by
softmax(cosine / 0.02) and sums their soft labels; the patch label map is upsampled
bilinearly to the mask and scored by mIoU, ignore pixels excluded.

Memory stays bounded: the bank is allocated once at its final size and filled in place
(``--memory_size`` caps it, keeping per image the patches of its rarer classes first), the
search indexes it one slice at a time (``knn.nearest_neighbors``), and validation patches go
through in loader batches.

Under torchrun (or SLURM) the work is sharded: each rank embeds its contiguous share of the
training images of every augmentation pass, and the rows are streamed to every rank in
dataset order into its one bank; each rank then labels its share of the validation images
and the pixel counts are summed. An item's crop, flip and patch choice are seeded by
(seed, pass, index), so the memory and every number are those of one process.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dino_locat.data.multicrop import STREAM_MEMORY, derive_seed
from dino_locat.data.segmentation import (
    IGNORE_INDEX,
    RandomResizedCropPair,
    SeededPass,
    SegmentationTransform,
    collate_keep_masks,
)
from dino_locat.distributed import (
    is_distributed,
    rank,
    rows_from_every_rank,
    shard_bounds,
    sum_over_ranks,
    world_size,
)
from dino_locat.evaluation.backbone import frozen_backbone
from dino_locat.evaluation.features import (
    feature_batches,
    normalized_patch_tokens,
    shard_dataset,
    shard_header,
)
from dino_locat.evaluation.knn import nearest_neighbors
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
from dino_locat.evaluation.segmentation import add_segmentation_data_args, segmentation_datasets

NUM_NEIGHBORS = 30
TEMPERATURE = 0.02
INPUT_SIZE = 224


def patch_soft_labels(
    masks: Tensor, patch_size: int, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """(B, H, W) label masks -> (B, h*w, C): each patch's fraction of labelled pixels per class.

    Ignore pixels count for no class and not in the denominator; a patch with no labelled
    pixel gets all zeros. Pixels beyond the last whole patch are dropped, as the patch
    embedding drops them. Counted with one bincount, never a (B, H, W, C) one-hot.
    """
    batch, height, width = masks.shape
    h, w = height // patch_size, width // patch_size
    masks = masks[:, : h * patch_size, : w * patch_size].long()
    rows = torch.arange(h * patch_size) // patch_size
    cols = torch.arange(w * patch_size) // patch_size
    patch = (rows[:, None] * w + cols[None, :]).expand(batch, -1, -1)
    image = torch.arange(batch)[:, None, None] * (h * w)
    valid = masks != ignore_index
    if bool((masks[valid] >= num_classes).any()) or bool((masks[valid] < 0).any()):
        raise ValueError(f"mask labels must lie in 0..{num_classes - 1} or be {ignore_index}")
    flat = ((image + patch) * num_classes + masks)[valid]
    counts = torch.bincount(flat, minlength=batch * h * w * num_classes).float()
    counts = counts.view(batch, h * w, num_classes)
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


def rarer_classes_first(soft_labels: Tensor, budget: int, generator: torch.Generator) -> Tensor:
    """Indices of at most ``budget`` labelled patches of one image, rarer classes first.

    A patch scores the number of the image's patches that share each of its classes, summed,
    times a uniform random factor; the lowest scores are kept (the public Hummingbird rule),
    so small objects are not crowded out of a capped memory by background. Patches without
    a labelled pixel are never kept.
    """
    present = soft_labels > 0
    labelled = present.any(dim=1).nonzero().flatten()
    if len(labelled) <= budget:
        return labelled
    frequency = present[labelled].sum(dim=0).float()
    score = (present[labelled].float() @ frequency) * torch.rand(len(labelled), generator=generator)
    return labelled[score.topk(budget, largest=False).indices.sort().values]


class MemoryBank:
    """Patch features (N, D) float32 and soft labels (N, C) float16, allocated once.

    Filled in place batch by batch; ``features``/``labels`` are views of the filled rows, so
    the search reads the one allocation and no second full copy is ever made.
    """

    def __init__(self, capacity: int, dim: int, num_classes: int) -> None:
        self._features = torch.empty(capacity, dim, dtype=torch.float32)
        self._labels = torch.empty(capacity, num_classes, dtype=torch.float16)
        self.size = 0

    def add(self, features: Tensor, labels: Tensor) -> None:
        end = self.size + len(features)
        if end > len(self._features):
            raise RuntimeError(f"memory bank overflow: {end} rows > {len(self._features)}")
        self._features[self.size : end] = features
        self._labels[self.size : end] = labels
        self.size = end

    @property
    def features(self) -> Tensor:
        return self._features[: self.size]

    @property
    def labels(self) -> Tensor:
        return self._labels[: self.size]


def build_memory(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    patch_size: int,
    input_size: int,
    epochs: int,
    memory_size: int | None,
    device: torch.device,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
) -> tuple[MemoryBank, dict[str, int]]:
    """The memory over ``epochs`` augmented passes of ``dataset`` (randomly augmented
    (image, mask) pairs at input size), each pass a ``SeededPass``.

    Without ``memory_size`` every labelled patch is kept; with it, each image keeps
    ``memory_size // (images x epochs)`` patches (``rarer_classes_first``, seeded per image
    and pass). With several processes each rank embeds its shard of every pass and all ranks
    receive the rows, in dataset order, into their bank.
    """
    patches = (input_size // patch_size) ** 2
    images = len(dataset) * epochs
    if memory_size is None:
        per_image, capacity = patches, images * patches
    else:
        per_image = memory_size // images
        if per_image < 1:
            raise EvaluationInputError(
                f"--memory_size {memory_size} is smaller than the {images} training images x "
                "augmentation epochs: not one patch per image would fit"
            )
        per_image = min(per_image, patches)
        capacity = per_image * images
    embed_dim = model.embed_dim
    bank = MemoryBank(capacity, embed_dim, num_classes)
    start, stop = shard_bounds(len(dataset), rank(), world_size())
    unlabelled = torch.zeros(1, dtype=torch.long)
    for epoch in range(epochs):
        shard = shard_dataset(SeededPass(dataset, seed, epoch))
        loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers)
        # One process fills the bank itself; a rank fills its share, then all ranks stream.
        target = bank
        if is_distributed():
            target = MemoryBank((stop - start) * per_image, embed_dim, num_classes)
        index = start
        header = shard_header(f"memory pass {epoch + 1}/{epochs}", len(shard))
        for features, masks in feature_batches(
            model, loader, normalized_patch_tokens, device, header
        ):
            soft = patch_soft_labels(torch.as_tensor(masks), patch_size, num_classes)
            for image_features, image_labels in zip(features, soft, strict=True):
                generator = torch.Generator().manual_seed(
                    derive_seed(STREAM_MEMORY, seed, epoch, index)
                )
                keep = rarer_classes_first(image_labels, per_image, generator)
                unlabelled += int((image_labels.sum(dim=1) == 0).sum())
                target.add(image_features[keep], image_labels[keep].half())
                index += 1
        if target is not bank:
            for rows, labels in rows_from_every_rank(target.features, target.labels):
                bank.add(rows, labels)
    stats = {"patches": bank.size, "capacity": capacity, "patches_per_image": per_image}
    stats["unlabelled_patches_skipped"] = int(sum_over_ranks(unlabelled))
    return bank, stats


def retrieve_soft_labels(
    bank_features: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    k: int = NUM_NEIGHBORS,
    temperature: float = TEMPERATURE,
) -> Tensor:
    """(Q, C) class scores: the ``k`` nearest memory patches of each query (inner product of
    normalised features = cosine), weighted by softmax(cos / T), their soft labels summed."""
    sims, ids = nearest_neighbors(bank_features, queries, k)
    weights = torch.softmax(torch.from_numpy(sims) / temperature, dim=1)
    neighbour_labels = bank_labels[torch.from_numpy(ids)].float()
    return torch.einsum("qk,qkc->qc", weights, neighbour_labels)


def patch_label_maps(
    bank: MemoryBank, queries: Tensor, num_classes: int, k: int, temperature: float
) -> Tensor:
    """(B, C, h, w) class scores of a batch of square patch grids of queries (B, h*w, D)."""
    batch, patches, dim = queries.shape
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{patches} query patches per image do not form a square grid")
    scores = retrieve_soft_labels(
        bank.features, bank.labels, queries.reshape(-1, dim), k, temperature
    )
    return scores.view(batch, side, side, num_classes).permute(0, 3, 1, 2)


def score_label_maps(confusion: ConfusionMatrix, maps: Tensor, masks: list[Tensor]) -> None:
    """Upsample each label map bilinearly to its mask, take the argmax, count the pixels."""
    for label_map, mask in zip(maps, masks, strict=True):
        upsampled = F.interpolate(
            label_map[None], size=tuple(mask.shape), mode="bilinear", align_corners=False
        )
        confusion.update(upsampled.argmax(dim=1)[0], mask)


@torch.no_grad()
def evaluate_retrieval(
    model: nn.Module,
    bank: MemoryBank,
    loader: DataLoader,
    num_classes: int,
    k: int,
    temperature: float,
    device: torch.device,
) -> ConfusionMatrix:
    """Label every validation image of ``loader`` (this rank's share) by retrieval and count
    the pixels (255 ignored); the counts of all ranks are summed."""
    confusion = ConfusionMatrix(num_classes, IGNORE_INDEX)
    header = shard_header("query patches", len(loader.dataset))
    batches = feature_batches(model, loader, normalized_patch_tokens, device, header)
    for queries, masks in batches:
        maps = patch_label_maps(bank, queries, num_classes, k, temperature)
        score_label_maps(confusion, maps, masks)
    confusion.counts = sum_over_ranks(confusion.counts)
    return confusion


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "Hummingbird dense nearest-neighbour retrieval of a frozen backbone (mIoU, no training)",
        add_help=add_help,
    )
    add_backbone_args(
        parser,
        required=False,
        raw_pixels=True,
        input_size_help=f"images are resized to this side (default: {INPUT_SIZE}, the "
        "protocol's; on the embedded scenes their --canvas_size)",
    )
    add_run_args(parser, batch_size=64)
    add_segmentation_data_args(parser)
    group = parser.add_argument_group("Hummingbird")
    group.add_argument(
        "--augmentation_epochs",
        type=int,
        default=1,
        help="augmented passes (random resized crop + flip) over the training images that "
        "build the memory (1)",
    )
    group.add_argument(
        "--memory_size",
        type=int,
        default=None,
        help="cap on memory patches, rarer classes kept first (default: unbounded)",
    )
    group.add_argument(
        "--num_neighbors", type=int, default=NUM_NEIGHBORS, help="k nearest memory patches (30)"
    )
    group.add_argument(
        "--temperature",
        type=float,
        default=TEMPERATURE,
        help="neighbour weights softmax(cosine / T) (0.02)",
    )
    return parser


def _datasets(args: argparse.Namespace, input_size: int) -> tuple[Dataset, Dataset, list[str]]:
    return segmentation_datasets(
        args,
        RandomResizedCropPair(input_size),
        SegmentationTransform(input_size, train=False, keep_mask_size=True),
    )


def run_hummingbird(args: argparse.Namespace) -> dict[str, Any]:
    """Build the memory, retrieve every validation patch, report mIoU."""
    check_positive(
        args, "image_size", "augmentation_epochs", "memory_size", "num_neighbors", "temperature"
    )
    check_positive(args, "batch_size_per_gpu", "train_scenes", "test_scenes")
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    embedded = args.data_path is None
    input_size = args.image_size or (args.canvas_size if embedded else INPUT_SIZE)
    model, info = frozen_backbone(args, device, image_size=input_size)
    input_size, patch_size = info["image_size"], info["patch_size"]
    if input_size % patch_size:
        raise EvaluationInputError(
            f"--input_size {input_size} is not a multiple of the patch size {patch_size}"
        )
    train_set, val_set, classes = _datasets(args, input_size)
    bank, stats = build_memory(
        model,
        train_set,
        len(classes),
        patch_size,
        input_size,
        args.augmentation_epochs,
        args.memory_size,
        device,
        args.seed,
        args.batch_size_per_gpu,
        args.num_workers,
    )
    if bank.size == 0:
        raise EvaluationInputError("the training masks label no pixel: the memory is empty")
    k = min(args.num_neighbors, bank.size)
    gigabytes = bank.features.numel() * 4 / 2**30
    print(
        f"memory: {bank.size} patches from {len(train_set)} images x "
        f"{args.augmentation_epochs} augmentation epoch(s), {gigabytes:.2f} GB of features; "
        f"k = {k}",
        flush=True,
    )
    if k < args.num_neighbors:
        print(f"note: --num_neighbors {args.num_neighbors} exceeds the memory; using k = {k}")
    val_loader = DataLoader(
        shard_dataset(val_set),
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        collate_fn=collate_keep_masks,
    )
    confusion = evaluate_retrieval(
        model, bank, val_loader, len(classes), k, args.temperature, device
    )
    iou = confusion.iou()
    print(iou_table(iou, classes))
    miou, accuracy = confusion.mean_iou(), confusion.pixel_accuracy()
    print(f"Hummingbird mIoU {miou:.2f}%  pixel accuracy {accuracy:.2f}%", flush=True)
    report = Report(default_output_dir(args, "hummingbird"), "hummingbird")
    step = info["epoch"] or 0
    report.scalar("mIoU", miou, step)
    report.scalar("pixel_accuracy", accuracy, step)
    results = {
        "evaluation": "hummingbird",
        **{key: info[key] for key in ("checkpoint", "checkpoint_key", "arch", "epoch")},
        "input_size": input_size,
        "num_classes": len(classes),
        "ignore_index": IGNORE_INDEX,
        "augmentation_epochs": args.augmentation_epochs,
        "memory_size": args.memory_size,
        "memory": stats,
        "num_neighbors": k,
        "temperature": args.temperature,
        "mIoU": miou,
        "pixel_accuracy": accuracy,
        "per_class_iou": {
            name: (None if value != value else 100.0 * value)
            for name, value in zip(classes, iou.tolist(), strict=True)
        },
    }
    report.finish(results)
    return results
