"""Which images a classification evaluator sees: an ImageFolder's train/ and val/, or the
embedded Fashion-MNIST train/test split, each optionally cut to an evenly spread subset."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

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
) -> ClassificationSplits:
    """Train and test datasets with their class names and a one-line description.

    ``--data_path`` must hold ``train/`` and ``val/`` class folders with the same classes.
    Without it, Fashion-MNIST's train/test split is used, by default cut to
    ``embedded_sizes`` so that the default command stays quick on a CPU.
    """
    embedded = data_path is None
    n_train = _subset_size(train_subset, embedded_sizes[0], embedded)
    n_test = _subset_size(test_subset, embedded_sizes[1], embedded)
    if embedded:
        sizes = (60000, 10000)
        train = FashionMNIST(
            "train", transform=train_transform, indices=spread_indices(sizes[0], n_train)
        )
        test = FashionMNIST(
            "test", transform=test_transform, indices=spread_indices(sizes[1], n_test)
        )
        return ClassificationSplits(
            train,
            test,
            FashionMNIST.classes,
            f"Fashion-MNIST (embedded default): {len(train)} of 60000 train images, "
            f"{len(test)} of 10000 test images (--train_subset/--test_subset, 0 = all)",
        )
    root = Path(data_path)
    folders = {}
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise EvaluationInputError(
                f"--data_path {root} has no {split}/ folder (expected ImageNet layout: "
                "train/<class>/*.jpg and val/<class>/*.jpg)"
            )
        folders[split] = ImageFolderDataset(
            root / split, transform=train_transform if split == "train" else test_transform
        )
    if folders["train"].classes != folders["val"].classes:
        raise EvaluationInputError(
            f"--data_path {root}: train/ and val/ hold different class folders"
        )
    picked = []
    for dataset, size in ((folders["train"], n_train), (folders["val"], n_test)):
        indices = spread_indices(len(dataset), size)
        picked.append(dataset if indices is None else Subset(dataset, indices))
    return ClassificationSplits(
        picked[0],
        picked[1],
        folders["train"].classes,
        f"ImageFolder {root}: {len(picked[0])} train/ and {len(picked[1])} val/ images, "
        f"{len(folders['train'].classes)} classes",
    )
