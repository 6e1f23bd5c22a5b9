"""mIoU against a confusion matrix computed by hand, ignore index included."""

from __future__ import annotations

import math

import pytest
import torch

from dino_locat.evaluation.metrics import ConfusionMatrix, iou_table

# 3 classes, 255 = ignore. Valid (target, prediction) pairs, read off by hand:
# (0,0) (0,1) (1,1) (1,2) (2,2) (2,2); the two 255 targets are dropped whatever is predicted.
TARGETS = torch.tensor([[0, 0, 1, 255], [1, 2, 2, 255]])
PREDICTIONS = torch.tensor([[0, 1, 1, 0], [2, 2, 2, 1]])
HAND_CONFUSION = [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
# IoU_c = TP / (row_c + col_c - TP): class 0: 1/(2+1-1); class 1: 1/(2+2-1); class 2: 2/(2+3-2)
HAND_IOU = [1 / 2, 1 / 3, 2 / 3]


def test_confusion_matrix_and_miou_match_hand_computation():
    confusion = ConfusionMatrix(3, ignore_index=255)
    confusion.update(PREDICTIONS, TARGETS)
    assert confusion.counts.tolist() == HAND_CONFUSION
    assert confusion.iou().tolist() == pytest.approx(HAND_IOU)
    assert confusion.mean_iou() == pytest.approx(100 * sum(HAND_IOU) / 3)
    assert confusion.pixel_accuracy() == pytest.approx(100 * 4 / 6)


def test_updates_accumulate_and_absent_classes_leave_the_mean():
    confusion = ConfusionMatrix(4, ignore_index=255)
    confusion.update(PREDICTIONS[:1], TARGETS[:1])
    confusion.update(PREDICTIONS[1:], TARGETS[1:])
    iou = confusion.iou()
    assert iou[:3].tolist() == pytest.approx(HAND_IOU)
    assert math.isnan(iou[3])  # never a target nor a prediction
    assert confusion.mean_iou() == pytest.approx(100 * sum(HAND_IOU) / 3)
    table = iou_table(iou, ["a", "b", "c", "d"]).splitlines()
    assert table[1].split() == ["a", "50.00"] and table[4].split() == ["d", "-"]


def test_labels_outside_the_classes_are_an_error():
    confusion = ConfusionMatrix(3, ignore_index=255)
    with pytest.raises(ValueError, match="label 7"):
        confusion.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
