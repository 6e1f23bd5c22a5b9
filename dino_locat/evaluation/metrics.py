"""Accuracy and mIoU: the numbers every evaluator reports."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def topk_correct(scores: Tensor, targets: Tensor, ks: Sequence[int]) -> list[int | None]:
    """How many targets are among the ``k`` best-scored classes, per k.

    None for a k that is not smaller than the number of classes would make trivially 100%
    (k > number of classes), so that top-5 is only reported with at least 5 classes.
    Classes are ranked by a stable descending sort, as DINO's k-NN classifier ranks them:
    equal scores (e.g. the zero score of every class no neighbour voted for) keep class
    order, where ``topk`` would order them arbitrarily and move top-5 on a few queries.
    """
    num_classes = scores.shape[1]
    order = scores.sort(dim=1, descending=True, stable=True).indices
    best = order[:, : min(max(ks), num_classes)]
    hits = best == targets[:, None]
    return [None if k > num_classes else int(hits[:, :k].any(dim=1).sum()) for k in ks]


class ConfusionMatrix:
    """Pixel counts (target class x predicted class), ignoring one label value."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, predictions: Tensor, targets: Tensor) -> None:
        valid = targets != self.ignore_index
        target, pred = targets[valid].long().cpu(), predictions[valid].long().cpu()
        if target.numel() and int(target.max()) >= self.num_classes:
            raise ValueError(
                f"target label {int(target.max())} is outside 0..{self.num_classes - 1} "
                f"and is not the ignore index {self.ignore_index}"
            )
        flat = target * self.num_classes + pred
        self.counts += torch.bincount(flat, minlength=self.num_classes**2).view(
            self.num_classes, self.num_classes
        )

    def iou(self) -> Tensor:
        """Per-class IoU; NaN for a class absent from both targets and predictions."""
        counts = self.counts.double()
        hit = counts.diag()
        union = counts.sum(0) + counts.sum(1) - hit
        return torch.where(union > 0, hit / union.clamp_min(1), torch.nan)

    def mean_iou(self) -> float:
        """Mean over the classes that occur (in targets or predictions), in %."""
        return 100.0 * float(self.iou().nanmean())

    def mean_accuracy(self) -> float:
        """Mean over the classes present in the targets of their pixels' accuracy, in %
        (mAcc, as segmentation benchmarks report it next to mIoU)."""
        counts = self.counts.double()
        total = counts.sum(1)
        per_class = torch.where(total > 0, counts.diag() / total.clamp_min(1), torch.nan)
        return 100.0 * float(per_class.nanmean())

    def pixel_accuracy(self) -> float:
        """Share of all counted pixels labelled right (aAcc), in %."""
        total = int(self.counts.sum())
        return 100.0 * int(self.counts.diag().sum()) / max(total, 1)


def iou_table(iou: Tensor, class_names: Sequence[str]) -> str:
    """A two-column text table of per-class IoU (%), "-" where the class never occurs."""
    width = max(len("class"), *(len(name) for name in class_names))
    lines = [f"{'class':<{width}}  IoU (%)"]
    for name, value in zip(class_names, iou.tolist(), strict=True):
        shown = "-" if value != value else f"{100 * value:6.2f}"
        lines.append(f"{name:<{width}}  {shown:>7}")
    return "\n".join(lines)
