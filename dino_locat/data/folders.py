"""Image folders (``root/<class>/<image>``) and the pretraining dataset choice.

Design: docs/architecture.md#data.

An unreadable image raises :class:`UnreadableImageError` naming the file, in the main
process or in a loader worker alike, instead of a bare PIL traceback deep in a worker.
With ``skip_corrupt=True`` every file is decoded once up front and the unreadable ones are
dropped and counted, so the dataset's length, labels and indices stay consistent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from dino_locat.data.fashion_mnist import FashionMNIST


class UnreadableImageError(OSError):
    """An image file that PIL cannot decode; the message names the file."""


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully into an RGB image, or raise an error that names it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        raise UnreadableImageError(
            f"cannot read image file {path}: {err} (pass skip_corrupt=True / --skip_corrupt "
            "to skip unreadable files)"
        ) from err


def _readable(path: str) -> bool:
    try:
        load_rgb(path)
    except UnreadableImageError:
        return False
    return True


class ImageFolderDataset(ImageFolder):
    """torchvision's ImageFolder with clear errors for unreadable files.

    ``skipped`` lists the files dropped by ``skip_corrupt`` (empty otherwise).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        super().__init__(os.fspath(root), transform=transform, loader=load_rgb)
        self.skipped: list[str] = []
        if skip_corrupt:
            self._drop_unreadable()

    def _drop_unreadable(self) -> None:
        """Decode every file once (threads: PIL releases the GIL) and keep the good ones."""
        paths = [path for path, _ in self.samples]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            ok = list(pool.map(_readable, paths, chunksize=64))
        self.skipped = [path for path, good in zip(paths, ok, strict=True) if not good]
        self.samples = [s for s, good in zip(self.samples, ok, strict=True) if good]
        self.imgs = self.samples
        self.targets = [target for _, target in self.samples]
        if not self.samples:
            raise FileNotFoundError(f"no readable image in {self.root}")

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


def spread_indices(length: int, subset: int | None) -> list[int] | None:
    """``subset`` indices spread evenly over ``range(length)`` (all classes of a sorted
    ImageFolder are kept), or None for everything."""
    if not subset or subset >= length:
        return None
    return [i * length // subset for i in range(subset)]


def build_pretraining_dataset(
    data_path: str | os.PathLike | None,
    subset: int | None = None,
    skip_corrupt: bool = False,
) -> tuple[Dataset, str]:
    """The images DINO trains on, untransformed: an ImageFolder, or Fashion-MNIST's train
    split when ``data_path`` is None; ``subset`` keeps N evenly spread images.

    Returns (dataset, a one-line description for the log).
    """
    if data_path is None:
        full = FashionMNIST("train")
        indices = spread_indices(len(full), subset)
        dataset: Dataset = full if indices is None else FashionMNIST("train", indices=indices)
        return dataset, f"Fashion-MNIST train split, {len(dataset)} images (embedded default)"
    folder = ImageFolderDataset(data_path, skip_corrupt=skip_corrupt)
    indices = spread_indices(len(folder), subset)
    if indices is not None:
        folder.samples = [folder.samples[i] for i in indices]
        folder.imgs = folder.samples
        folder.targets = [target for _, target in folder.samples]
    note = f", {folder.num_skipped} unreadable files skipped" if skip_corrupt else ""
    return folder, f"ImageFolder {data_path}, {len(folder)} images{note}"
