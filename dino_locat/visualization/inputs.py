"""The fixed image batch a figure is made from: image files, or the embedded test split."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from dino_locat.data.fashion_mnist import FashionMNIST
from dino_locat.data.folders import load_rgb
from dino_locat.data.transforms import eval_transform


def load_image_files(paths: Sequence[str | os.PathLike], image_size: int) -> Tensor:
    """(B, 3, S, S) normalised batch from image files; a bad file is named in the error."""
    transform = eval_transform(image_size)
    return torch.stack([transform(load_rgb(os.fspath(path))) for path in paths])


def load_fashion_mnist(num_images: int, image_size: int, root: str | None = None) -> Tensor:
    """The first ``num_images`` of the embedded Fashion-MNIST test split, as a batch."""
    dataset = FashionMNIST("test", root=root, transform=eval_transform(image_size))
    if not 0 < num_images <= len(dataset):
        raise ValueError(f"--num_images must be in 1..{len(dataset)}, got {num_images}")
    return torch.stack([dataset[i][0] for i in range(num_images)])


def load_images(
    paths: Sequence[str | os.PathLike] | None,
    num_images: int,
    image_size: int,
    data_path: str | None = None,
) -> Tensor:
    """Image files when given, else the embedded dataset's first ``num_images`` test images."""
    if paths:
        return load_image_files(paths, image_size)
    return load_fashion_mnist(num_images, image_size, data_path)
