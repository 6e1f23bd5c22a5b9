"""Which images a classification evaluator sees: an ImageFolder's train/ and val/, or the
embedded Fashion-MNIST train/test split, each optionally cut to an evenly spread subset;
optionally a held-out part of the training split on which a probe is selected (never the
test split, whose number would then be optimistic)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from dino_locat.data.fashion_mnist import FashionMNIST
from dino_locat.data.folders import ImageFolderDataset, spread_indices
from dino_locat.evaluation.options import EvaluationInputError

Transform = Callable[[Any], Any]


@dataclass
class ClassificationSplits:
    train: Dataset
    test: Dataset
    classes: Sequence[str]
    description: str
    val: Dataset | None = None


class TransformedSubset(Dataset):
    """Items ``indices`` of an untransformed (image, label) dataset, through ``transform``.

    One dataset read with two transforms: the augmented part a probe trains on and the
    plain held-out part it is selected on, without scanning the files twice.
    """

    def __init__(
        self, dataset: Dataset, indices: Sequence[int], transform: Transform | None
    ) -> None:
        self.dataset, self.indices, self.transform = dataset, list(indices), transform
        labels = dataset.targets  # type: ignore[attr-defined]
        self.targets = [int(labels[i]) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[self.indices[index]]
        return (self.transform(image) if self.transform else image), label


def stratified_holdout(
    labels: Sequence[int], fraction: float, seed: int = 0
) -> tuple[list[int], list[int]]:
    """(kept, held out) positions: ``fraction`` of every class held out, at random (seeded).

    Each class with at least two items gives at least one held-out item and keeps at least
    one, so every class is both trained on and selected on.
    """
    if not 0 < fraction < 1:
        raise EvaluationInputError(f"--val_fraction must be in (0, 1), got {fraction}")
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    held: list[int] = []
    for label in labels_t.unique().tolist():
        members = (labels_t == label).nonzero().flatten()
        count = min(max(round(fraction * len(members)), 1), len(members) - 1)
        picked = members[torch.randperm(len(members), generator=generator)[:count]]
        held += picked.tolist()
    held_set = set(held)
    kept = [i for i in range(len(labels_t)) if i not in held_set]
    return kept, sorted(held)


def _subset_size(value: int | None, embedded_default: int, embedded: bool) -> int | None:
    if value is not None and value < 0:
        raise EvaluationInputError(f"subset sizes must be >= 0, got {value}")
    if value is None:
        return embedded_default if embedded else None
    return value or None


def classification_splits(
    data_path: str | None,
    train_transform: Transform,
    test_transform: Transform,
    train_subset: int | None = None,
    test_subset: int | None = None,
    embedded_sizes: tuple[int, int] = (10000, 2000),
    val_fraction: float = 0.0,
    val_data_path: str | None = None,
    seed: int = 0,
) -> ClassificationSplits:
    """Train and test datasets with their class names and a one-line description.

    ``--data_path`` must hold ``train/`` and ``val/`` class folders with the same classes.
    Without it, Fashion-MNIST's train/test split is used, by default cut to
    ``embedded_sizes`` so that the default command stays quick on a CPU. A held-out
    ``val`` set (test transform) comes from ``val_data_path`` (class folders) or, with
    ``val_fraction`` > 0, from that fraction of each class of the (subset) training split,
    which the probe then no longer trains on.
    """
    embedded = data_path is None
    n_train = _subset_size(train_subset, embedded_sizes[0], embedded)
    n_test = _subset_size(test_subset, embedded_sizes[1], embedded)
    if embedded:
        train_base: Dataset = FashionMNIST("train", indices=spread_indices(60000, n_train))
        test: Dataset = FashionMNIST(
            "test", transform=test_transform, indices=spread_indices(10000, n_test)
        )
        classes: Sequence[str] = FashionMNIST.classes
        description = (
            f"Fashion-MNIST (embedded default): {len(train_base)} of 60000 train images, "
            f"{len(test)} of 10000 test images (--train_subset/--test_subset, 0 = all)"
        )
        train_positions = list(range(len(train_base)))
    else:
        root = Path(data_path)
        folders = {}
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise EvaluationInputError(
                    f"--data_path {root} has no {split}/ folder (expected ImageNet layout: "
                    "train/<class>/*.jpg and val/<class>/*.jpg)"
                )
            folders[split] = ImageFolderDataset(
                root / split, transform=None if split == "train" else test_transform
            )
        if folders["train"].classes != folders["val"].classes:
            raise EvaluationInputError(
                f"--data_path {root}: train/ and val/ hold different class folders"
            )
        train_base = folders["train"]
        classes = folders["train"].classes
        train_positions = spread_indices(len(train_base), n_train) or list(range(len(train_base)))
        test_indices = spread_indices(len(folders["val"]), n_test)
        test = folders["val"]
        if test_indices is not None:
            test = TransformedSubset(folders["val"], test_indices, None)
        description = (
            f"ImageFolder {root}: {len(train_positions)} train/ and {len(test)} val/ images, "
            f"{len(classes)} classes"
        )
    val: Dataset | None = None
    if val_data_path is not None:
        val = ImageFolderDataset(val_data_path, transform=test_transform)
        if list(val.classes) != list(classes):
            raise EvaluationInputError(
                f"--val_data_path {val_data_path}: its class folders differ from the "
                "training classes"
            )
        description += f"; selection on {len(val)} images of --val_data_path {val_data_path}"
    elif val_fraction:
        labels = [train_base.targets[i] for i in train_positions]  # type: ignore[attr-defined]
        kept, held = stratified_holdout(labels, val_fraction, seed)
        val = TransformedSubset(train_base, [train_positions[i] for i in held], test_transform)
        train_positions = [train_positions[i] for i in kept]
        description += (
            f"; {len(held)} training images held out for selection "
            f"({val_fraction:g} per class, seed {seed}), {len(kept)} trained on"
        )
    train = TransformedSubset(train_base, train_positions, train_transform)
    return ClassificationSplits(train, test, classes, description, val)
