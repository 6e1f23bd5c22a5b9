"""Replayable multi-crop sampling: a sample's views depend only on (seed, epoch, index).

The sampler hands out ``(epoch, index)`` pairs, so loader workers (persistent or not)
always know the epoch, and the dataset seeds a private generator per sample. An epoch
that is replayed after a restart therefore produces bit-identical batches, whatever the
number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Sampler

from dino_locat.data.transforms import MultiCropAugmentation

STREAM_VIEWS = 0
STREAM_MODEL = 1
STREAM_PAIRS = 2
STREAM_MEMORY = 3


def derive_seed(stream: int, *keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative integer keys.

    ``stream`` keeps unrelated uses apart: the views of a sample are
    ``derive_seed(STREAM_VIEWS, seed, epoch, index)``, the model-side randomness (drop
    path) of an epoch on a rank is ``derive_seed(STREAM_MODEL, seed, epoch, rank)``; an
    augmented segmentation pair (``SeededPass``) and Hummingbird's choice of its memory
    patches use ``STREAM_PAIRS`` and ``STREAM_MEMORY`` with (seed, epoch, index).
    """
    state = np.random.SeedSequence([stream, *keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class MultiCropDataset(Dataset):
    """Wraps an (image, label) dataset; item ``(epoch, index)`` -> (views, label)."""

    def __init__(self, images: Dataset, augment: MultiCropAugmentation, seed: int) -> None:
        self.images = images
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> tuple[list[Tensor], int]:
        epoch, index = item
        image, label = self.images[index]
        generator = torch.Generator().manual_seed(
            derive_seed(STREAM_VIEWS, self.seed, epoch, index)
        )
        return self.augment(image, generator), label


class EpochSampler(Sampler):
    """A DistributedSampler (shuffled with ``seed + epoch``) that yields (epoch, index).

    Rank r takes items r, r + N, r + 2N ... of the epoch's permutation, and the tail that
    does not divide by N is dropped rather than padded with repeats. So step t of N ranks at
    batch B sees exactly the images of step t of one process at batch N * B (the
    permutation's items t*N*B up to (t+1)*N*B), in as many steps: N processes train as one.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        self.sampler = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, index) for index in self.sampler)
