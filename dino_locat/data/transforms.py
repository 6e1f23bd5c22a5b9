"""Image transforms: DINO's multi-crop augmentation and the evaluation transform.

The multi-crop augmentation draws every random number from an explicit
``torch.Generator``, never from the global RNGs. A caller that seeds the generator from
(seed, epoch, index) therefore gets the same crops for a sample whatever the worker, the
number of workers, or whether the epoch is replayed after a restart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = transforms.InterpolationMode.BICUBIC


def eval_transform(image_size: int) -> transforms.Compose:
    """Resize to ``image_size * 256/224``, centre-crop ``image_size``, ImageNet-normalise.

    DINO's k-NN/linear protocol (resize 256, crop 224), scaled to the configured size.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return transforms.Compose(
        [
            transforms.Resize(round(image_size * 256 / 224), interpolation=BICUBIC),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _chance(generator: torch.Generator, p: float) -> bool:
    return p > 0 and torch.rand((), generator=generator).item() < p


def random_resized_crop_box(
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop with area fraction in ``scale`` and aspect in ``ratio``.

    Up to ten draws; if none fits in the image, fall back to the largest centred crop of
    an aspect ratio within ``ratio`` (torchvision's RandomResizedCrop rule).
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    aspect = width / height
    if aspect < min(ratio):
        w, h = width, round(width / min(ratio))
    elif aspect > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class CropView:
    """One view of DINO's recipe: crop+resize, flip, colour jitter, grey, blur, solarise."""

    def __init__(
        self,
        size: int,
        scale: Sequence[float],
        blur_p: float,
        solarize_p: float,
        blur_sigma: Sequence[float],
    ) -> None:
        self.size = size
        self.scale = tuple(scale)
        self.blur_p = blur_p
        self.solarize_p = solarize_p
        self.blur_sigma = tuple(blur_sigma)
        self.normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def color_jitter(self, image: Image.Image, generator: torch.Generator) -> Image.Image:
        """Brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a random order."""
        factors = [
            _uniform(generator, 0.6, 1.4),
            _uniform(generator, 0.6, 1.4),
            _uniform(generator, 0.8, 1.2),
            _uniform(generator, -0.1, 0.1),
        ]
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for i in torch.randperm(4, generator=generator).tolist():
            image = ops[i](image, factors[i])
        return image

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Tensor:
        top, left, h, w = random_resized_crop_box(
            image.width, image.height, self.scale, (3 / 4, 4 / 3), generator
        )
        image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], BICUBIC)
        if _chance(generator, 0.5):
            image = TF.hflip(image)
        if _chance(generator, 0.8):
            image = self.color_jitter(image, generator)
        if _chance(generator, 0.2):
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if _chance(generator, self.blur_p):
            sigma = _uniform(generator, *self.blur_sigma)
            image = image.filter(ImageFilter.GaussianBlur(radius=sigma))
        if _chance(generator, self.solarize_p):
            image = ImageOps.solarize(image, threshold=128)
        return self.normalize(TF.to_tensor(image))


class MultiCropAugmentation:
    """DINO multi-crop: 2 global views (blur p 1.0 / 0.1, solarise 0.2 on the second) and
    ``local_crops_number`` local views (blur p 0.5).

    Call with ``(image, generator)``; returns the list of view tensors, globals first.
    The blur sigma range is DINO's 0.1-2.0 px at 224 px, scaled with the global crop size
    so that small images (Fashion-MNIST at 32 px) are not blurred away.
    """

    @classmethod
    def from_args(cls, args: Any) -> MultiCropAugmentation:
        """The augmentation described by DINO's crop flags (--global_crops_scale, ...)."""
        return cls(
            args.global_crops_scale,
            args.local_crops_scale,
            args.local_crops_number,
            args.global_crops_size,
            args.local_crops_size,
        )

    def __init__(
        self,
        global_crops_scale: Sequence[float] = (0.4, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.4),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
    ) -> None:
        sigma = (0.1 * global_crops_size / 224, 2.0 * global_crops_size / 224)
        self.global_views = [
            CropView(global_crops_size, global_crops_scale, 1.0, 0.0, sigma),
            CropView(global_crops_size, global_crops_scale, 0.1, 0.2, sigma),
        ]
        self.local_view = CropView(local_crops_size, local_crops_scale, 0.5, 0.0, sigma)
        self.local_crops_number = local_crops_number

    def __call__(self, image: Image.Image, generator: torch.Generator) -> list[Tensor]:
        image = image.convert("RGB")
        views = [view(image, generator) for view in self.global_views]
        views += [self.local_view(image, generator) for _ in range(self.local_crops_number)]
        return views
