"""Held-out selection data for the linear probe: stratified, disjoint, never the test split."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from dino_locat.evaluation.options import EvaluationInputError
from dino_locat.evaluation.splits import classification_splits, stratified_holdout


def test_stratified_holdout_takes_the_fraction_of_every_class_disjointly():
    labels = [0] * 50 + [1] * 20 + [2] * 3 + [3] * 1
    kept, held = stratified_holdout(labels, 0.1, seed=0)
    assert sorted(kept + held) == list(range(len(labels)))
    assert Counter(labels[i] for i in held) == {0: 5, 1: 2, 2: 1}  # class 3: nothing to spare
    assert stratified_holdout(labels, 0.1, seed=0) == (kept, held)
    assert stratified_holdout(labels, 0.1, seed=1)[1] != held
    with pytest.raises(EvaluationInputError, match="--val_fraction"):
        stratified_holdout(labels, 1.0)


def test_embedded_split_holds_out_training_images_not_test_images():
    splits = classification_splits(None, None, None, 200, 50, val_fraction=0.1, seed=0)
    assert len(splits.train) + len(splits.val) == 200 and len(splits.test) == 50
    train_ids = {splits.train.indices[i] for i in range(len(splits.train))}
    val_ids = {splits.val.indices[i] for i in range(len(splits.val))}
    assert not train_ids & val_ids
    per_class = Counter(splits.train.targets) + Counter(splits.val.targets)
    expected = {c: max(round(0.1 * n), 1) for c, n in per_class.items()}
    assert Counter(splits.val.targets) == expected
    assert splits.val.dataset.split == "train" and splits.test.split == "test"


def test_explicit_val_folder_must_have_the_training_classes(tmp_path, shared_image_folder):
    root = tmp_path / "data"
    root.mkdir()
    for split in ("train", "val"):
        (root / split).symlink_to(shared_image_folder)
    splits = classification_splits(str(root), None, None, val_data_path=str(shared_image_folder))
    assert len(splits.train) == len(splits.val) == 18  # the whole train split is trained on
    other = tmp_path / "other" / "dogs"
    other.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(other / "a.png")
    with pytest.raises(EvaluationInputError, match="--val_data_path"):
        classification_splits(str(root), None, None, val_data_path=str(other.parent))
