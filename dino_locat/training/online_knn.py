"""Online k-NN during pretraining: the curve that says whether the features improve.

Teacher and student backbones are evaluated with the evaluators' own feature extraction
and faiss k-NN (weighted 20-NN vote, DINO's protocol) before the first step and every
``--knn_freq`` epochs, on a fixed held-out split with bounded sizes. Next to them stand
the untrained network (the first point) and raw pixels (the same images, flattened), the
two baselines a learned number means nothing without.

Every rank takes part, so a probe costs each of N processes about 1/N of one process's time
and no rank waits in a training collective while another probes: each embeds its share of
the queries (gathered to every rank) and streams its share of the bank through the search,
then the ranks' top-k lists are merged and every rank computes the same numbers, those of
one process. Images are decoded as they are needed; what is held is the queries' features,
one batch of bank images and its features, and the top-k lists. All backbones scored at one
point (and raw pixels, at the first) share one pass over the images.

The probe never touches the training stream: it runs in eval mode without gradients and
inside a forked RNG, so a run with it on ends with the same weights as one without.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dino_locat.data.fashion_mnist import FashionMNIST
from dino_locat.data.folders import spread_indices
from dino_locat.data.transforms import eval_transform
from dino_locat.distributed import gather_rows, rank, shard_bounds, world_size
from dino_locat.evaluation.features import (
    Embed,
    extract_features,
    feature_batches,
    flattened_pixels,
    normalized_cls,
    shard_loader,
)
from dino_locat.evaluation.knn import NeighborStream, merge_over_ranks, neighbor_accuracy
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


RAW_PIXELS = "raw_pixels"


def raw_pixels() -> tuple[nn.Module, Embed]:
    """The raw-pixel scorer: the evaluation transform's output, flattened, L2-normalised."""
    return nn.Identity(), flattened_pixels


def backbone_scorer(backbone: nn.Module) -> tuple[nn.Module, Embed]:
    """A backbone scored by its L2-normalised CLS embedding (DINO's k-NN features)."""
    return backbone, normalized_cls


@contextmanager
def evaluating(models: list[nn.Module]) -> Iterator[None]:
    """Eval mode and no RNG side effects for the duration; training modes restored after."""
    modes = [model.training for model in models]
    try:
        with torch.random.fork_rng(devices=[]):
            for model in models:
                model.eval()
            yield
    finally:
        for model, mode in zip(models, modes, strict=True):
            model.train(mode)


def _joint_embed(embeds: list[Embed]) -> Embed:
    """One embedding that concatenates every scorer's, so one pass serves them all."""

    def embed(models: nn.Module, images: Tensor) -> Tensor:
        parts = [e(m, images).flatten(1).float() for e, m in zip(embeds, models, strict=True)]
        return torch.cat(parts, dim=1)

    return embed


class KnnProbe:
    """A fixed bank/query split and the way to score backbones on it, with any number of
    processes (every rank must call :meth:`top1` at the same point)."""

    def __init__(
        self,
        bank: Dataset,
        queries: Dataset,
        num_classes: int,
        description: str,
        num_workers: int = 0,
    ):
        self.splits = {"bank": bank, "queries": queries}
        self.num_classes = num_classes
        self.description = description
        self.num_workers = num_workers

    def _loader(self, name: str, device: torch.device) -> DataLoader:
        return DataLoader(
            self.splits[name],
            batch_size=BATCH_SIZE,
            num_workers=self.num_workers,
            pin_memory=device.type == "cuda",
        )

    def top1(
        self, scorers: Mapping[str, tuple[nn.Module, Embed]], device: torch.device
    ) -> dict[str, float]:
        """20-NN top-1 accuracy (%) of each scorer's ``embed(model, images)`` features.

        Sharded over the ranks (see the module docstring); every rank returns the same dict.
        """
        names = list(scorers)
        models = nn.ModuleList(scorers[name][0] for name in names)
        embed = _joint_embed([scorers[name][1] for name in names])
        bank_size = len(self.splits["bank"])
        k = min(K, bank_size)
        with evaluating(list(models)):
            with torch.no_grad():  # each scorer's feature size, from one image
                image = self.splits["queries"][0][0][None].to(device)
                dims = [e(m, image).flatten(1).shape[1] for m, e in scorers.values()]
            queries, query_labels = extract_features(
                models, self._loader("queries", device), embed, device, "k-NN queries",
                verbose=False,
            )  # fmt: skip
            streams = [NeighborStream(part, k) for part in queries.split(dims, dim=1)]
            del queries
            first, _ = shard_bounds(bank_size, rank(), world_size())
            loader = shard_loader(self._loader("bank", device))
            labels = []
            batches = feature_batches(models, loader, embed, device, "k-NN bank", verbose=False)
            for features, targets in batches:
                for stream, part in zip(streams, features.split(dims, dim=1), strict=True):
                    stream.add(part, first)
                first += len(features)
                labels.append(torch.as_tensor(targets))
        mine = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
        bank_labels = gather_rows(mine.long(), to_all=True)
        results = {}
        for name, stream in zip(names, streams, strict=True):
            sims, ids = merge_over_ranks(*stream.result())
            accuracy = neighbor_accuracy(
                sims, bank_labels[ids], query_labels, self.num_classes, (K,)
            )
            results[name] = float(accuracy[K]["top1"])
        return results


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
        return KnnProbe(
            splits.train, queries_set, len(splits.classes), splits.description, args.num_workers
        )
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
        args.num_workers,
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
