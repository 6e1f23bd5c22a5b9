"""The embedded default dataset: Fashion-MNIST read straight from its idx files.

Design: docs/architecture.md#data.

Debian's ``dataset-fashion-mnist`` ships the four gzipped idx files under
``/usr/share/datasets/fashion-mnist/``; we read them as they are (no conversion step) and
hand out PIL images, so every torchvision transform applies unchanged.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ROOT_ENV = "DINO_LOCAT_FASHION_MNIST"
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8}


class DatasetMissingError(FileNotFoundError):
    """Fashion-MNIST is not installed where we look; the message says how to get it."""


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the idx files: ``root``, else $DINO_LOCAT_FASHION_MNIST, else Debian's."""
    return Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DatasetMissingError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}. Install it with "
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or point "
        f"${ROOT_ENV} (or --data_path) at a folder holding the four idx files."
    )


def read_idx(path: Path) -> np.ndarray:
    """Parse one (optionally gzipped) idx file into a numpy array, checking its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read idx file {path}: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {body.size} values")
    return body.reshape(shape)


class FashionMNIST(Dataset):
    """Fashion-MNIST as (PIL RGB image, label) pairs; ``indices`` selects a subset."""

    classes = CLASSES

    def __init__(
        self,
        split: str = "train",
        root: str | os.PathLike | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        indices: Sequence[int] | None = None,
    ) -> None:
        if split not in _FILES:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        folder = fashion_mnist_root(root)
        image_file, label_file = (_find(folder, stem) for stem in _FILES[split])
        self.images = read_idx(image_file)
        self.labels = read_idx(label_file).astype(np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{image_file} and {label_file} hold different numbers of items")
        self.indices = np.arange(len(self.labels)) if indices is None else np.asarray(indices)
        self.transform = transform
        self.split = split

    @property
    def targets(self) -> list[int]:
        return self.labels[self.indices].tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        i = int(self.indices[index])
        image = Image.fromarray(self.images[i]).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])
