"""Segmentation datasets: the folder layouts (real image/PNG files) and Fashion-MNIST scenes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dino_locat.data.fashion_mnist import FashionMNIST
from dino_locat.data.segmentation import (
    FOREGROUND_THRESHOLD,
    ITEM_SIZE,
    FashionMNISTScenes,
    SegmentationDataError,
    SegmentationFolder,
    SegmentationTransform,
    collate_keep_masks,
)


def write_pair(image_path, mask_path, mask):
    """A random RGB image and its single-channel index mask, as real files."""
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(mask.size)
    pixels = rng.integers(0, 255, (*mask.shape, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image_path)
    Image.fromarray(mask.astype(np.uint8)).save(mask_path)


def test_ade20k_layout_shifts_labels_and_ignores_zero(tmp_path):
    mask = np.array([[0, 1, 150], [2, 0, 75]])
    for split in ("training", "validation"):
        write_pair(
            tmp_path / "images" / split / "ADE_1.jpg",
            tmp_path / "annotations" / split / "ADE_1.png",
            mask,
        )
    dataset = SegmentationFolder(tmp_path, "val")
    assert dataset.layout == "ade20k" and len(dataset.classes) == 150
    image, labels = dataset[0]
    assert image.size == (3, 2)
    assert np.array(labels).tolist() == [[255, 0, 149], [1, 255, 74]]


def test_voc_layout_reads_palette_indices_and_split_lists(tmp_path):
    mask = np.array([[0, 15, 255], [20, 1, 0]], dtype=np.uint8)
    for stem in ("a", "b"):
        write_pair(
            tmp_path / "JPEGImages" / f"{stem}.jpg",
            tmp_path / "SegmentationClass" / f"{stem}.png",
            mask,
        )
    palette_mask = Image.fromarray(mask).convert("P")
    palette_mask.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    palette_mask.save(tmp_path / "SegmentationClass" / "b.png")
    assert Image.open(tmp_path / "SegmentationClass" / "b.png").mode == "P"
    listing = tmp_path / "ImageSets" / "Segmentation"
    listing.mkdir(parents=True)
    (listing / "train.txt").write_text("a\n")
    (listing / "val.txt").write_text("b\n")
    dataset = SegmentationFolder(tmp_path, "val")
    assert dataset.layout == "voc" and dataset.classes[15] == "person"
    assert [p.name for p, _ in dataset.pairs] == ["b.jpg"]
    assert np.array(dataset[0][1]).tolist() == mask.tolist()
    (listing / "train.txt").write_text("a\nmissing\n")
    with pytest.raises(SegmentationDataError, match="lists missing"):
        SegmentationFolder(tmp_path, "train")


def test_generic_layout_classes_and_errors(tmp_path):
    write_pair(tmp_path / "images/train/x.png", tmp_path / "masks/train/x.png", np.array([[0, 3]]))
    dataset = SegmentationFolder(tmp_path, "train")
    assert dataset.layout == "folders" and len(dataset.classes) == 4  # read off the masks
    (tmp_path / "classes.txt").write_text("sky\nroad\ncar\n")
    dataset = SegmentationFolder(tmp_path, "train")
    with pytest.raises(SegmentationDataError, match=r"x.png holds label 3.*3 classes"):
        dataset[0]
    with pytest.raises(SegmentationDataError, match="--num_classes 5 contradicts"):
        SegmentationFolder(tmp_path, "train", num_classes=5)
    Image.new("RGB", (2, 1)).save(tmp_path / "masks/train/x.png")
    with pytest.raises(SegmentationDataError, match="mode RGB"):
        SegmentationFolder(tmp_path, "train")[0]
    Image.new("RGB", (2, 1)).save(tmp_path / "images/train/y.png")
    with pytest.raises(SegmentationDataError, match="y.png has no mask"):
        SegmentationFolder(tmp_path, "train")
    with pytest.raises(SegmentationDataError, match="no 'val' split folder"):
        SegmentationFolder(tmp_path, "val")
    with pytest.raises(SegmentationDataError, match="matches no segmentation layout"):
        SegmentationFolder(tmp_path / "images", "train")


def test_scenes_are_seeded_and_masks_follow_the_pixels():
    scenes = FashionMNISTScenes("train", num_scenes=20, canvas_size=64, seed=3)
    again = FashionMNISTScenes("train", num_scenes=5, canvas_size=64, seed=3)
    other = FashionMNISTScenes("train", num_scenes=5, canvas_size=64, seed=4)
    for i in range(5):
        (canvas, mask), (canvas2, mask2) = scenes.scene(i), again.scene(i)
        assert np.array_equal(canvas, canvas2) and np.array_equal(mask, mask2)
    assert any(not np.array_equal(scenes.scene(i)[0], other.scene(i)[0]) for i in range(5))
    classes_seen = set()
    for i in range(len(scenes)):
        canvas, mask = scenes.scene(i)
        assert canvas.shape == mask.shape == (64, 64)
        # Derived masks: labelled exactly where a pasted item is brighter than the threshold.
        assert np.array_equal(mask > 0, canvas > FOREGROUND_THRESHOLD)
        assert mask.max() <= 10
        classes_seen |= set(np.unique(mask).tolist())
    assert len(classes_seen) > 5
    image, labels = scenes[0]
    assert image.mode == "RGB" and image.size == (64, 64)
    assert np.array_equal(np.array(labels), scenes.scene(0)[1])


def test_scene_items_come_from_their_split():
    for split in ("train", "test"):
        source = FashionMNIST(split)
        scenes = FashionMNISTScenes(split, num_scenes=3, canvas_size=ITEM_SIZE, items=(1, 1))
        canvas, mask = scenes.scene(0)
        # A 28-px canvas holds one item at (0, 0): it must be a real image of that split.
        foreground = source.images > FOREGROUND_THRESHOLD
        matches = np.flatnonzero(
            (np.where(foreground, source.images, 0) == canvas).all(axis=(1, 2))
        )
        assert len(matches) >= 1
        assert int(mask.max()) - 1 in {int(source.labels[m]) for m in matches}


def test_transform_resizes_images_and_keeps_or_resizes_masks():
    image = Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8))
    mask = Image.fromarray(np.tile(np.arange(60, dtype=np.uint8) // 20, (40, 1)))
    pixels, labels = SegmentationTransform(32, train=False)(image, mask)
    assert pixels.shape == (3, 32, 32) and labels.shape == (32, 32)
    assert set(labels.unique().tolist()) == {0, 1, 2} and labels.dtype == torch.long
    pixels, kept = SegmentationTransform(32, train=False, keep_mask_size=True)(image, mask)
    assert kept.shape == (40, 60)
    images, masks = collate_keep_masks([(pixels, kept), (pixels, labels)])
    assert images.shape == (2, 3, 32, 32) and [m.shape for m in masks] == [(40, 60), (32, 32)]
