"""Multi-crop augmentation and the evaluation transform, on real PIL images."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import draw_image
from PIL import Image

from dino_locat.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropAugmentation,
    eval_transform,
    random_resized_crop_box,
)


def test_eval_transform_resizes_centre_crops_and_normalises():
    image = Image.new("RGB", (300, 200), color=(255, 0, 128))
    out = eval_transform(64)(image)
    assert out.shape == (3, 64, 64)
    colour = (1.0, 0.0, 128 / 255)
    expected = [(v - m) / s for v, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-3)
    # A 256-px vertical ramp (row r has value r): resize to 256 is a no-op, the 224 centre
    # crop starts at row 16, so the first row of the output holds 16 / 255.
    ramp = Image.linear_gradient("L").convert("RGB")
    centre = eval_transform(224)(ramp)
    assert centre.shape == (3, 224, 224)
    first_row = centre[0, 0].mean().item() * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    assert first_row == pytest.approx(16 / 255, abs=2 / 255)
    with pytest.raises(ValueError, match="image_size"):
        eval_transform(0)


def test_multicrop_views_have_the_configured_sizes_and_count():
    augment = MultiCropAugmentation(local_crops_number=3, global_crops_size=32, local_crops_size=16)
    views = augment(draw_image(0, seed=1), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)


def test_multicrop_depends_only_on_the_generator_seed():
    augment = MultiCropAugmentation(local_crops_number=2, global_crops_size=32, local_crops_size=16)
    image = draw_image(1, seed=3)
    first = augment(image, torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global RNG must not matter
    again = augment(image, torch.Generator().manual_seed(7))
    other = augment(image, torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_random_resized_crop_box_stays_inside_and_respects_scale():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(40, 36, (0.05, 0.4), (3 / 4, 4 / 3), generator)
        assert 0 <= top and top + h <= 36 and 0 <= left and left + w <= 40
        area = h * w / (40 * 36)
        assert 0.03 <= area <= 0.45  # rounding of h and w moves the area slightly
        assert 3 / 4 - 0.2 <= w / h <= 4 / 3 + 0.2
    # Impossible request (full area at an extreme ratio): centred fallback within bounds.
    top, left, h, w = random_resized_crop_box(40, 10, (1.0, 1.0), (1.0, 1.0), generator)
    assert (h, w) == (10, 10) and (top, left) == (0, 15)
    assert math.isclose(w / h, 1.0)
