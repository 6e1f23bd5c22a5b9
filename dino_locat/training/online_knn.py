"""Online k-NN during pretraining: the curve that says whether the features improve.

Teacher and student backbones are evaluated with the evaluators' own feature extraction
and faiss k-NN (weighted 20-NN vote, DINO's protocol) before the first step and every
``--knn_freq`` epochs, on a fixed held-out split with bounded sizes. Next to them stand
the untrained network (the first point) and raw pixels (the same images, flattened), the
two baselines a learned number means nothing without.

The probe never touches the training stream: it runs in eval mode without gradients and
inside a forked RNG, so a run with it on ends with the same weights as one without.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dino_locat.data.fashion_mnist import FashionMNIST
from dino_locat.data.folders import spread_indices
from dino_locat.data.transforms import eval_transform
from dino_locat.evaluation.features import Embed, extract_features, flattened_pixels, normalized_cls
from dino_locat.evaluation.knn import knn_accuracy
from dino_locat.evaluation.splits import classification_splits

K = 20
FASHION_MNIST_TRAIN = 60000
BATCH_SIZE = 256


def embedded_bank_indices(
    subset: int, size: int, queries: int = 0
) -> tuple[list[int], list[int], bool]:
    """``size`` evenly spread Fashion-MNIST train indices outside the pretraining subset, and
    ``queries`` more (held-out train queries) outside both.

    Returns (bank, queries, overlaps): with too few images left over (``--subset 0`` trains
    on all of them), the bank is spread over the whole split, the queries over the rest, and
    ``overlaps`` is True.
    """
    used = spread_indices(FASHION_MNIST_TRAIN, subset or None)
    if used is None:
        free = np.arange(0)
    else:
        free = np.setdiff1d(np.arange(FASHION_MNIST_TRAIN), np.asarray(used))
    overlaps = len(free) < size + queries
    if overlaps:
        free = np.arange(FASHION_MNIST_TRAIN)
    bank = [int(free[i]) for i in spread_indices(len(free), size) or range(len(free))]
    if not queries:
        return bank, [], overlaps
    rest = np.setdiff1d(free, np.asarray(bank))
    held = [int(rest[i]) for i in spread_indices(len(rest), queries) or range(len(rest))]
    return bank, held, overlaps


class KnnProbe:
    """A fixed bank/query split and the way to score a backbone on it.

    The evaluation transform is deterministic, so the images are transformed once and
    kept as tensors; every later evaluation is forwards only.
    """

    def __init__(self, bank: Dataset, queries: Dataset, num_classes: int, description: str):
        self.splits = {"bank": bank, "queries": queries}
        self.num_classes = num_classes
        self.description = description
        self._tensors: dict[str, TensorDataset] = {}

    def _images(self, name: str) -> TensorDataset:
        if name not in self._tensors:
            loader = DataLoader(self.splits[name], batch_size=BATCH_SIZE, num_workers=0)
            images, labels = zip(*loader, strict=True)
            self._tensors[name] = TensorDataset(torch.cat(images), torch.cat(labels))
        return self._tensors[name]

    def top1(self, model: nn.Module, device: torch.device, embed: Embed = normalized_cls) -> float:
        """20-NN top-1 accuracy (%) of ``embed(model, images)`` features."""
        was_training = model.training
        model.eval()
        features = []
        try:
            with torch.random.fork_rng(devices=[]):
                for name in ("bank", "queries"):
                    loader = DataLoader(self._images(name), batch_size=BATCH_SIZE)
                    features.append(
                        extract_features(model, loader, embed, device, name, verbose=False)
                    )
        finally:
            model.train(was_training)
        (bank_x, bank_y), (query_x, query_y) = features
        result = knn_accuracy(bank_x, bank_y, query_x, query_y, self.num_classes, (K,))
        return float(result[K]["top1"])

    def raw_pixels_top1(self) -> float:
        """The same k-NN on L2-normalised raw pixels (the evaluation transform's output)."""
        return self.top1(nn.Identity(), torch.device("cpu"), flattened_pixels)


def build_knn_probe(args: argparse.Namespace) -> KnnProbe | None:
    """The probe the flags ask for, or None when online k-NN is off.

    ``--knn_data_path`` (a folder with train/ and val/) when given; else, on the embedded
    data, a bank of Fashion-MNIST train images outside the pretraining subset and queries
    from its test split; else (``--data_path`` alone) none.
    """
    if not args.knn_freq:
        return None
    transform = eval_transform(args.global_crops_size)
    held_out = args.knn_queries == "train"
    if args.knn_data_path is not None:
        if held_out:
            total = args.knn_train_images + args.knn_test_images
            if not args.knn_train_images or not args.knn_test_images:
                raise ValueError(
                    "--knn_queries train needs --knn_train_images and "
                    "--knn_test_images > 0 (both come from train/)"
                )
            splits = classification_splits(
                args.knn_data_path, transform, transform, total, 1,
                val_fraction=args.knn_test_images / total,
            )  # fmt: skip
            queries_set = splits.val
        else:
            splits = classification_splits(
                args.knn_data_path, transform, transform, args.knn_train_images,
                args.knn_test_images,
            )  # fmt: skip
            queries_set = splits.test
        return KnnProbe(splits.train, queries_set, len(splits.classes), splits.description)
    if args.data_path is not None:
        return None
    if held_out and not args.knn_test_images:
        raise ValueError("--knn_queries train needs --knn_test_images > 0")
    bank_indices, query_indices, overlaps = embedded_bank_indices(
        args.subset, args.knn_train_images, args.knn_test_images if held_out else 0
    )
    bank = FashionMNIST("train", transform=transform, indices=bank_indices)
    if held_out:
        queries = FashionMNIST("train", transform=transform, indices=query_indices)
        kind = "held-out train queries"
    else:
        queries = FashionMNIST(
            "test", transform=transform, indices=spread_indices(10000, args.knn_test_images)
        )
        kind = "test queries"
    where = (
        "spread over all train images (overlaps the pretraining subset)"
        if overlaps
        else "outside the pretraining subset"
    )
    return KnnProbe(
        bank,
        queries,
        len(FashionMNIST.classes),
        f"Fashion-MNIST: bank of {len(bank)} train images {where}, {len(queries)} {kind}",
    )


def knn_summary(history: list[dict[str, Any]], raw_pixels: float | None) -> str:
    """``k-NN 20-NN top-1: untrained a% -> teacher b%, student c% (raw pixels d%)``."""
    first, last = history[0], history[-1]
    text = (
        f"k-NN {K}-NN top-1: untrained {first['teacher_top1']:.1f}% -> teacher "
        f"{last['teacher_top1']:.1f}%, student {last['student_top1']:.1f}%"
    )
    if first["epoch"] != 0:
        text = text.replace("untrained", f"epoch {first['epoch']}")
    if raw_pixels is not None:
        text += f" (raw pixels {raw_pixels:.1f}%)"
    return text
