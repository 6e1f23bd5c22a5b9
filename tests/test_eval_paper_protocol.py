"""The paper's frozen-segmentation protocol: layouts, augmentation, head, schedule, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dino_locat.data.segmentation import (
    COCO_STUFF_NUM_CLASSES,
    IGNORE_INDEX,
    PaperTestTransform,
    PaperTrainTransform,
    SegmentationDataError,
    SegmentationFolder,
    rescale_size,
)
from dino_locat.evaluation.metrics import ConfusionMatrix
from dino_locat.evaluation.segmentation import PaperSegmentationHead, one_cycle


def write_pair(image_path, mask_path, mask, image_size=None):
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    height, width = image_size or mask.shape
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image_path)
    Image.fromarray(mask.astype(np.uint8)).save(mask_path)


def test_pascal_context_layout_ignores_background_and_shifts(tmp_path):
    mask = np.array([[0, 1, 59], [2, 0, 30]])
    write_pair(tmp_path / "JPEGImages/a.jpg", tmp_path / "SegmentationClassContext/a.png", mask)
    (tmp_path / "ImageSets/SegmentationContext").mkdir(parents=True)
    (tmp_path / "ImageSets/SegmentationContext/val.txt").write_text("a\n")
    (tmp_path / "SegmentationClass").mkdir()  # a VOC2010 tree also has this: Context wins
    dataset = SegmentationFolder(tmp_path, "val")
    assert dataset.layout == "context" and len(dataset.classes) == 59
    assert np.array(dataset[0][1]).tolist() == [[255, 0, 58], [1, 255, 29]]
    write_pair(tmp_path / "JPEGImages/a.jpg", tmp_path / "SegmentationClassContext/a.png", mask + 1)
    with pytest.raises(SegmentationDataError, match=r"a.png holds label 59"):
        dataset[0]


def test_coco_stuff_layout_reads_train_ids_or_maps_raw_ids(tmp_path):
    converted = np.array([[0, 170, 255]])
    raw = np.array([[0, 12, 181], [11, 91, 255]])  # 11 is an unused id
    write_pair(
        tmp_path / "images/val2017/1.jpg", tmp_path / "annotations/val2017/1_labelTrainIds.png",
        converted,
    )  # fmt: skip
    write_pair(tmp_path / "images/val2017/2.jpg", tmp_path / "annotations/val2017/2.png", raw)
    dataset = SegmentationFolder(tmp_path, "val")
    assert dataset.layout == "cocostuff" and len(dataset.classes) == COCO_STUFF_NUM_CLASSES == 171
    assert np.array(dataset[0][1]).tolist() == [[0, 170, 255]]
    # Raw ids: 0 -> 0; 12 -> 11 (one unused id below it); 91 -> 80 (11 unused below);
    # 181 -> 170; unused 11 and 255 -> ignore.
    assert np.array(dataset[1][1]).tolist() == [[0, 11, 170], [255, 80, 255]]
    write_pair(
        tmp_path / "images/val2017/2.jpg", tmp_path / "annotations/val2017/2.png",
        np.array([[0, 200]]),
    )  # fmt: skip
    with pytest.raises(SegmentationDataError, match=r"2.png holds id 200"):
        dataset[1]


def test_bad_files_are_errors_naming_them(tmp_path):
    write_pair(tmp_path / "images/train/a.png", tmp_path / "masks/train/a.png", np.zeros((4, 6)))
    (tmp_path / "classes.txt").write_text("sky\nroad\n")
    (tmp_path / "masks/train/a.png").write_bytes(b"not a png")
    with pytest.raises(SegmentationDataError, match=r"cannot read mask .*a.png"):
        SegmentationFolder(tmp_path, "train")[0]
    write_pair(
        tmp_path / "images/train/a.png", tmp_path / "masks/train/a.png", np.zeros((4, 6)),
        image_size=(5, 6),
    )  # fmt: skip
    with pytest.raises(SegmentationDataError, match=r"mask .*a.png is 6x4 but image .*a.png"):
        SegmentationFolder(tmp_path, "train")[0]


def test_rescale_fits_the_long_short_frame():
    assert rescale_size(300, 200, (2048, 512)) == (768, 512)  # short side 512
    assert rescale_size(3000, 500, (2048, 512)) == (2048, 341)  # long side capped
    assert rescale_size(200, 300, (4096, 520)) == (520, 780)


def test_train_view_is_a_padded_crop_where_no_class_dominates():
    image = Image.fromarray(np.full((100, 200, 3), 128, dtype=np.uint8))
    labels = np.zeros((100, 200), dtype=np.uint8)
    labels[50:, 150:] = 1  # a small object in a corner: most 50-px windows are background
    mask = Image.fromarray(labels)
    shares = {1: [], 1000: []}
    for retries in shares:
        transform = PaperTrainTransform((200, 100), crop=50, ratio_range=(1, 1), retries=retries)
        for seed in range(20):
            torch.manual_seed(seed)
            pixels, target = transform(image, mask)
            assert pixels.shape == (3, 50, 50) and target.shape == (50, 50)
            shares[retries].append(float(torch.bincount(target.flatten()).max()) / target.numel())
    assert max(shares[1000]) < 0.75 and max(shares[1]) >= 0.75
    # An image smaller than the crop is padded: image with 0, mask with the ignore index.
    transform = PaperTrainTransform((40, 20), crop=32, ratio_range=(1, 1))
    pixels, target = transform(image, mask)
    assert pixels.shape == (3, 32, 32) and (target[20:] == IGNORE_INDEX).all()
    assert (pixels[:, 20:] == 0).all()


def test_test_view_keeps_aspect_and_the_original_mask():
    image = Image.fromarray(np.zeros((200, 300, 3), dtype=np.uint8))
    mask = Image.fromarray(np.ones((200, 300), dtype=np.uint8))
    pixels, target = PaperTestTransform()(image, mask)
    assert pixels.shape == (3, 512, 768) and target.shape == (200, 300)


def test_paper_head_and_schedule():
    head = PaperSegmentationHead(192, 7)
    assert head[0].bias is None and head[1].num_groups == 1 and head[3].bias is not None
    assert abs(float(head[0].weight.std()) - 0.01) < 0.001
    assert head(torch.randn(2, 192, 4, 5)).shape == (2, 7, 4, 5)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = one_cycle(optimizer, 1e-3, 100)
    lrs = []
    for _ in range(100):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(1e-3 / 25) and max(lrs) == pytest.approx(1e-3)
    assert int(np.argmax(lrs)) in (24, 25) and lrs[-1] < 1e-6
    rising, falling = np.diff(lrs[:24]), np.diff(lrs[26:])
    assert np.allclose(rising, rising[0]) and np.allclose(falling, falling[0])  # linear


def test_mean_accuracy_averages_the_classes_present():
    confusion = ConfusionMatrix(3, IGNORE_INDEX)
    confusion.update(torch.tensor([0, 0, 1, 1, 2, 255]), torch.tensor([0, 0, 0, 1, 1, 255]))
    # class 0: 2 of 3 right, class 1: 1 of 2, class 2 absent from the targets.
    assert confusion.mean_accuracy() == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)
    assert confusion.pixel_accuracy() == pytest.approx(100 * 3 / 5)
