"""Segmentation datasets: (PIL RGB image, PIL "L" mask of class indices, 255 = ignore).

Every dataset here hands out masks already mapped to ``0 .. num_classes - 1`` with one ignore
value, so the evaluator never needs to know which layout the files came from:

- ADE20K (``ADEChallengeData2016``): ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png``; 150 classes, file label 0 ("other") is
  ignored and the rest shift down by one.
- Pascal VOC (``VOC2012``): ``JPEGImages/``, palette PNGs in ``SegmentationClass/`` and the
  split lists ``ImageSets/Segmentation/{train,val}.txt``; 21 classes, 255 (object borders)
  is ignored.
- PASCAL Context-59 (mmseg's ``VOC2010`` layout): ``JPEGImages/``,
  ``SegmentationClassContext/`` and ``ImageSets/SegmentationContext/{train,val}.txt``;
  60 file labels, 0 (background) is ignored and the rest shift down by one: 59 classes.
- COCO-Stuff-164k: ``images/{train2017,val2017}/*.jpg`` and
  ``annotations/{train2017,val2017}/``, either ``<stem>_labelTrainIds.png`` (171 classes,
  as mmseg's conversion writes them) or the raw ``<stem>.png`` stuff-thing maps, whose 182
  ids (11 of them unused) are mapped to the same 171 classes; 255 is ignored.
- Generic folders: ``images/<split>/`` and ``masks/<split>/<same stem>.png``; class names
  from ``classes.txt`` (one per line) when present, else the number of classes is read off
  the masks.
- Fashion-MNIST scenes (the embedded default): canvases holding 2-4 real Fashion-MNIST
  items at seeded random places. Their masks are DERIVED from the items' pixel intensities
  (foreground = intensity above a threshold), not drawn by annotators.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from dino_locat.data.fashion_mnist import CLASSES as FASHION_CLASSES
from dino_locat.data.fashion_mnist import FashionMNIST
from dino_locat.data.multicrop import STREAM_PAIRS, derive_seed
from dino_locat.data.transforms import IMAGENET_MEAN, IMAGENET_STD

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
ADE20K_NUM_CLASSES = 150
CONTEXT_NUM_CLASSES = 59
# Raw COCO-Stuff maps hold ids 0..181 (COCO category id - 1); these 11 name no category.
COCO_STUFF_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_STUFF_NUM_CLASSES = 182 - len(COCO_STUFF_UNUSED)
LAYOUTS = ("auto", "ade20k", "voc", "context", "cocostuff", "folders")
SPLIT_NAMES = {
    "train": ("train", "training", "train2017"),
    "val": ("val", "validation", "val2017"),
}
# Fashion-MNIST items are dark-background photographs; pixels above this (of 255) are the item.
FOREGROUND_THRESHOLD = 40
ITEM_SIZE = 28

Pair = tuple[Path, Path]


def _coco_stuff_train_ids() -> np.ndarray:
    """Lookup raw COCO-Stuff id (0..255) -> class 0..170, unused ids and 255 -> ignore."""
    table = np.full(256, IGNORE_INDEX, dtype=np.int64)
    used = [i for i in range(182) if i not in COCO_STUFF_UNUSED]
    table[used] = np.arange(len(used))
    return table


_COCO_STUFF_TRAIN_IDS = _coco_stuff_train_ids()


class SegmentationDataError(ValueError):
    """A segmentation folder or file that cannot be used; the message names it."""


def read_mask(path: Path) -> np.ndarray:
    """A single-channel index mask (palette PNGs give their indices, not colours)."""
    try:
        with Image.open(path) as mask:
            if mask.mode not in ("L", "P", "I", "I;16"):
                raise SegmentationDataError(
                    f"mask {path} has mode {mask.mode}: expected a single-channel index PNG"
                )
            return np.array(mask)
    except (OSError, UnidentifiedImageError) as err:
        raise SegmentationDataError(f"cannot read mask {path}: {err}") from err


def read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise SegmentationDataError(f"cannot read image {path}: {err}") from err


def _split_dir(parent: Path, split: str) -> Path:
    for name in SPLIT_NAMES.get(split, (split,)):
        if (parent / name).is_dir():
            return parent / name
    raise SegmentationDataError(
        f"no {split!r} split folder in {parent} (looked for {', '.join(SPLIT_NAMES[split])})"
    )


def _pair_by_stem(image_dir: Path, mask_dir: Path, suffixes: Sequence[str] = ("",)) -> list[Pair]:
    """Every image with its mask ``<stem><suffix>.png`` (first suffix found)."""
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise SegmentationDataError(f"no images in {image_dir}")
    pairs = []
    for image in images:
        candidates = [mask_dir / f"{image.stem}{suffix}.png" for suffix in suffixes]
        mask = next((c for c in candidates if c.is_file()), candidates[-1])
        if not mask.is_file():
            raise SegmentationDataError(f"image {image} has no mask {mask}")
        pairs.append((image, mask))
    return pairs


def detect_layout(root: Path) -> str:
    """Which of the supported layouts ``root`` holds."""
    if (root / "images").is_dir() and (root / "annotations").is_dir():
        coco = any((root / "images" / name).is_dir() for name in ("train2017", "val2017"))
        return "cocostuff" if coco else "ade20k"
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClassContext").is_dir():
        return "context"
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        return "voc"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "folders"
    raise SegmentationDataError(
        f"--data_path {root} matches no segmentation layout: expected images/ + annotations/ "
        "(ADE20K; COCO-Stuff with train2017/ val2017/), JPEGImages/ + SegmentationClass/ "
        "(Pascal VOC) or + SegmentationClassContext/ (PASCAL Context) or images/ + masks/"
    )


class SegmentationFolder(Dataset):
    """One split of an ADE20K, Pascal VOC or generic images/ + masks/ folder."""

    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        layout: str = "auto",
        transform: Callable[[Image.Image, Image.Image], Any] | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SegmentationDataError(f"--data_path {self.root} is not a folder")
        if layout not in LAYOUTS:
            raise SegmentationDataError(f"--layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = detect_layout(self.root) if layout == "auto" else layout
        self.split = split
        self.transform = transform
        if self.layout == "ade20k":
            self.pairs = _pair_by_stem(
                _split_dir(self.root / "images", split),
                _split_dir(self.root / "annotations", split),
            )
            self.classes = self._ade20k_names()
        elif self.layout == "voc":
            self.pairs = self._voc_pairs("Segmentation", "SegmentationClass")
            self.classes = VOC_CLASSES
        elif self.layout == "context":
            self.pairs = self._voc_pairs("SegmentationContext", "SegmentationClassContext")
            self.classes = tuple(f"class_{i:02d}" for i in range(CONTEXT_NUM_CLASSES))
        elif self.layout == "cocostuff":
            self.pairs = _pair_by_stem(
                _split_dir(self.root / "images", split),
                _split_dir(self.root / "annotations", split),
                suffixes=("_labelTrainIds", ""),
            )
            self.classes = tuple(f"class_{i:03d}" for i in range(COCO_STUFF_NUM_CLASSES))
        else:
            self.pairs = _pair_by_stem(
                _split_dir(self.root / "images", split), _split_dir(self.root / "masks", split)
            )
            self.classes = self._folder_names(num_classes)
        if num_classes is not None and num_classes != len(self.classes):
            raise SegmentationDataError(
                f"--num_classes {num_classes} contradicts the {self.layout} layout of "
                f"{self.root}, which has {len(self.classes)} classes"
            )

    def _ade20k_names(self) -> tuple[str, ...]:
        info = self.root / "objectInfo150.txt"
        if info.is_file():
            rows = info.read_text().splitlines()[1:]
            names = tuple(row.split("\t")[-1].split(";")[0].strip() for row in rows if row.strip())
            if len(names) == ADE20K_NUM_CLASSES:
                return names
        return tuple(f"class_{i:03d}" for i in range(ADE20K_NUM_CLASSES))

    def _voc_pairs(self, sets: str, masks: str) -> list[Pair]:
        listing = self.root / "ImageSets" / sets / f"{self.split}.txt"
        if not listing.is_file():
            raise SegmentationDataError(f"{self.layout} split file {listing} not found")
        pairs = []
        for stem in listing.read_text().split():
            image = self.root / "JPEGImages" / f"{stem}.jpg"
            mask = self.root / masks / f"{stem}.png"
            for path in (image, mask):
                if not path.is_file():
                    raise SegmentationDataError(f"{listing} lists {stem}, but {path} is missing")
            pairs.append((image, mask))
        if not pairs:
            raise SegmentationDataError(f"{listing} lists no images")
        return pairs

    def _folder_names(self, num_classes: int | None) -> tuple[str, ...]:
        names_file = self.root / "classes.txt"
        if names_file.is_file():
            return tuple(
                line.strip() for line in names_file.read_text().splitlines() if line.strip()
            )
        if num_classes is None:
            labels = [read_mask(mask) for _, mask in self.pairs]
            num_classes = 1 + max(int(m[m != IGNORE_INDEX].max(initial=0)) for m in labels)
            print(f"{self.root}: no classes.txt, {num_classes} classes read off the masks")
        return tuple(f"class_{i}" for i in range(num_classes))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        labels = read_mask(mask_path).astype(np.int64)
        if labels.shape != (image.height, image.width):
            raise SegmentationDataError(
                f"mask {mask_path} is {labels.shape[1]}x{labels.shape[0]} but image "
                f"{image_path} is {image.width}x{image.height}"
            )
        if self.layout in ("ade20k", "context"):
            labels = np.where(labels == 0, IGNORE_INDEX, labels - 1)
        elif self.layout == "cocostuff" and not mask_path.stem.endswith("_labelTrainIds"):
            raw_bad = (labels > 181) & (labels != IGNORE_INDEX)
            if raw_bad.any():
                raise SegmentationDataError(
                    f"mask {mask_path} holds id {int(labels[raw_bad].max())}; raw COCO-Stuff "
                    f"maps hold 0..181 and {IGNORE_INDEX} = ignore"
                )
            labels = _COCO_STUFF_TRAIN_IDS[labels]
        bad = (labels >= len(self.classes)) & (labels != IGNORE_INDEX)
        if bad.any():
            raise SegmentationDataError(
                f"mask {mask_path} holds label {int(labels[bad].max())}, but the dataset has "
                f"{len(self.classes)} classes (and {IGNORE_INDEX} = ignore)"
            )
        mask = Image.fromarray(labels.astype(np.uint8))
        return self.transform(image, mask) if self.transform else (image, mask)


class FashionMNISTScenes(Dataset):
    """Seeded canvases of 2-4 real Fashion-MNIST items; masks derived, not annotated.

    Label 0 is background; an item's foreground pixels (intensity > ``threshold``) get
    ``1 + its Fashion-MNIST class``. Items later in a scene are pasted over earlier ones
    where they are foreground, so the mask always says which item a visible pixel shows.
    Scene ``i`` depends only on (seed, split, i): subsets and worker order do not change it.
    Train scenes draw items from the train split, test scenes from the test split.
    """

    classes = ("background",) + FASHION_CLASSES
    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        split: str = "train",
        num_scenes: int = 1000,
        canvas_size: int = 64,
        items: tuple[int, int] = (2, 4),
        seed: int = 0,
        threshold: int = FOREGROUND_THRESHOLD,
        root: str | os.PathLike | None = None,
        transform: Callable[[Image.Image, Image.Image], Any] | None = None,
    ) -> None:
        if canvas_size < ITEM_SIZE:
            raise ValueError(f"canvas size {canvas_size} is smaller than an item ({ITEM_SIZE})")
        self.source = FashionMNIST(split, root=root)
        self.split = split
        self.num_scenes = num_scenes
        self.canvas_size = canvas_size
        self.items = items
        self.seed = seed
        self.threshold = threshold
        self.transform = transform

    def __len__(self) -> int:
        return self.num_scenes

    def scene(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(canvas uint8 (S, S), mask uint8 (S, S)) of scene ``index``."""
        if not 0 <= index < self.num_scenes:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, index])
        count = int(rng.integers(self.items[0], self.items[1] + 1))
        picks = rng.integers(0, len(self.source.labels), size=count)
        corners = rng.integers(0, self.canvas_size - ITEM_SIZE + 1, size=(count, 2))
        canvas = np.zeros((self.canvas_size, self.canvas_size), dtype=np.uint8)
        mask = np.zeros_like(canvas)
        for pick, (top, left) in zip(picks, corners, strict=True):
            item = self.source.images[pick]
            foreground = item > self.threshold
            window = (slice(top, top + ITEM_SIZE), slice(left, left + ITEM_SIZE))
            canvas[window][foreground] = item[foreground]
            mask[window][foreground] = 1 + self.source.labels[pick]
        return canvas, mask

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        canvas, mask = self.scene(index)
        image = Image.fromarray(canvas).convert("RGB")
        mask_image = Image.fromarray(mask)
        return self.transform(image, mask_image) if self.transform else (image, mask_image)


class SegmentationTransform:
    """Image and mask together: resize to a square (mask by nearest), flip when training.

    Evaluation keeps the mask at its original size (``keep_mask_size``), so mIoU is
    measured on the annotation's own pixels after the logits are upsampled to it.
    """

    def __init__(self, image_size: int, train: bool, keep_mask_size: bool = False) -> None:
        self.size = (image_size, image_size)
        self.train = train
        self.keep_mask_size = keep_mask_size
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[Tensor, Tensor]:
        pixels = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
        labels = torch.from_numpy(np.array(mask, dtype=np.int64))
        pixels = F.interpolate(
            pixels[None], size=self.size, mode="bilinear", align_corners=False, antialias=True
        )[0]
        if not self.keep_mask_size:
            labels = F.interpolate(labels[None, None].float(), size=self.size, mode="nearest")
            labels = labels[0, 0].long()
        if self.train and torch.rand(()) < 0.5:
            pixels, labels = pixels.flip(-1), labels.flip(-1)
        return (pixels - self.mean) / self.std, labels


def _normalized(image: Image.Image) -> Tensor:
    pixels = TF.to_tensor(image)
    return TF.normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)


def _labels(mask: Image.Image) -> Tensor:
    return torch.from_numpy(np.array(mask, dtype=np.int64))


class RandomResizedCropPair:
    """Hummingbird's memory augmentation: one random resized crop and a horizontal flip,
    the same for image and mask (mask by nearest neighbour, so labels stay labels).

    Crop areas of 0.5-2x the image (as the public Hummingbird evaluation draws them;
    torchvision keeps only draws that fit and falls back to a centre crop).
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.5, 2.0)) -> None:
        self.size, self.scale = [size, size], scale

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[Tensor, Tensor]:
        box = transforms.RandomResizedCrop.get_params(image, list(self.scale), [3 / 4, 4 / 3])
        image = TF.resized_crop(image, *box, self.size, InterpolationMode.BILINEAR, antialias=True)
        mask = TF.resized_crop(mask, *box, self.size, InterpolationMode.NEAREST)
        if torch.rand(()) < 0.5:
            image, mask = TF.hflip(image), TF.hflip(mask)
        return _normalized(image), _labels(mask)


class SeededPass(Dataset):
    """Pass ``epoch`` over a randomly augmented dataset: item ``i`` is drawn with torch's
    generator seeded from (seed, epoch, i), so its augmentation does not depend on which
    process, loader worker or batch loads it (sharded extraction sees one process's views).
    The global generator is restored afterwards."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(STREAM_PAIRS, self.seed, self.epoch, index))
            return self.dataset[index]


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(width, height) rescaled, aspect kept, to fit a (long, short) frame: the short side
    reaches ``scale[1]`` unless the long side would pass ``scale[0]`` (mmseg's keep-ratio
    resize, as the paper's protocol uses it)."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return max(1, int(width * factor + 0.5)), max(1, int(height * factor + 0.5))


def photometric_distortion(pixels: Tensor) -> Tensor:
    """Random brightness (+-32), contrast (x0.5-1.5), saturation (x0.5-1.5) and hue
    (+-18 of 180) changes, each with probability 1/2, contrast before or after the colour
    ones at random, on a (3, H, W) image in 0..255 (the paper's training augmentation)."""

    def maybe() -> bool:
        return bool(torch.rand(()) < 0.5)

    def uniform(low: float, high: float) -> float:
        return float(torch.empty(()).uniform_(low, high))

    def contrast(x: Tensor) -> Tensor:
        return (x * uniform(0.5, 1.5)).clamp(0, 255) if maybe() else x

    if maybe():
        pixels = (pixels + uniform(-32, 32)).clamp(0, 255)
    contrast_first = maybe()
    if contrast_first:
        pixels = contrast(pixels)
    if maybe():
        pixels = TF.adjust_saturation(pixels / 255, uniform(0.5, 1.5)) * 255
    if maybe():
        pixels = TF.adjust_hue(pixels / 255, uniform(-18, 18) / 180) * 255
    if not contrast_first:
        pixels = contrast(pixels)
    return pixels


class PaperTrainTransform:
    """The paper's frozen-segmentation training augmentation for (image, mask).

    Rescale into a (long, short) ``scale`` frame times a ratio drawn from ``ratio_range``
    (aspect kept), random ``crop`` x ``crop`` window in which no class holds more than
    ``cat_max_ratio`` of the labelled pixels (best of ``retries`` draws), horizontal flip,
    photometric distortion, normalisation, padding to the crop size (image 0, mask ignore).
    """

    def __init__(
        self,
        scale: tuple[int, int] = (2048, 512),
        crop: int = 512,
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        retries: int = 10,
    ) -> None:
        self.scale, self.crop, self.ratio_range = scale, crop, ratio_range
        self.cat_max_ratio, self.retries = cat_max_ratio, retries

    def _window(self, labels: np.ndarray) -> tuple[int, int]:
        height, width = labels.shape
        top = left = 0
        for _ in range(self.retries):
            top = int(torch.randint(0, max(height - self.crop, 0) + 1, ()))
            left = int(torch.randint(0, max(width - self.crop, 0) + 1, ()))
            window = labels[top : top + self.crop, left : left + self.crop]
            counts = np.bincount(window[window != IGNORE_INDEX].ravel())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return top, left

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[Tensor, Tensor]:
        ratio = float(torch.empty(()).uniform_(*self.ratio_range))
        frame = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        size = rescale_size(image.width, image.height, frame)
        image = image.resize(size, Image.BILINEAR)
        labels = np.array(mask.resize(size, Image.NEAREST), dtype=np.int64)
        top, left = self._window(labels)
        pixels = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)
        pixels = pixels[:, top : top + self.crop, left : left + self.crop]
        target = torch.from_numpy(labels[top : top + self.crop, left : left + self.crop])
        if torch.rand(()) < 0.5:
            pixels, target = pixels.flip(-1), target.flip(-1)
        pixels = TF.normalize(photometric_distortion(pixels) / 255, IMAGENET_MEAN, IMAGENET_STD)
        pad = (0, self.crop - pixels.shape[2], 0, self.crop - pixels.shape[1])
        return F.pad(pixels, pad, value=0.0), F.pad(target, pad, value=IGNORE_INDEX)


class PaperTestTransform:
    """The paper's test view: aspect kept, rescaled into the (long, short) ``scale`` frame
    (short side 512 for most images); the mask stays at its original size."""

    def __init__(self, scale: tuple[int, int] = (2048, 512)) -> None:
        self.scale = scale

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[Tensor, Tensor]:
        image = image.resize(rescale_size(image.width, image.height, self.scale), Image.BILINEAR)
        return _normalized(image), _labels(mask)


def collate_keep_masks(batch: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, list[Tensor]]:
    """Stack images; keep masks as a list (they may differ in size at evaluation)."""
    return torch.stack([image for image, _ in batch]), [mask for _, mask in batch]
