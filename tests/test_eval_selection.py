"""Held-out selection data for the linear probe: stratified, disjoint, never the test split;
the default head grid fits the backbone's depth."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino_locat.evaluation.linear import get_args_parser, run_linear
from dino_locat.evaluation.options import EvaluationInputError
from dino_locat.evaluation.splits import classification_splits, stratified_holdout
from dino_locat.models import build_backbone


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


@pytest.fixture(scope="module")
def one_block_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "locatvit_depth1.pth"
    torch.save(build_backbone("locatvit_t", img_size=32, patch_size=8, depth=1).state_dict(), path)
    return path


def test_default_n_last_blocks_drop_the_variants_deeper_than_the_backbone(
    one_block_weights, tmp_path, capsys
):
    flags = ["--pretrained_weights", str(one_block_weights), "--train_subset", "40",
             "--test_subset", "16", "--epochs", "1", "--lrs", "0.1", "--num_workers", "0",
             "--batch_size_per_gpu", "16", "--output_dir", str(tmp_path)]  # fmt: skip
    results = run_linear(get_args_parser().parse_args(flags))
    assert "default --n_last_blocks variant(s) 4 dropped, training 1" in capsys.readouterr().out
    assert results["n_last_blocks"] == [1]
    assert {h["name"] for h in results["heads_held_out"]} == {"n1_pool0_lr0.1", "n1_pool1_lr0.1"}
    assert (tmp_path / "results.json").is_file()
    # Asked for explicitly, a too-deep variant is the user's error, named, before any work.
    explicit = tmp_path / "explicit"
    args = get_args_parser().parse_args([*flags[:-1], str(explicit), "--n_last_blocks", "1", "4"])
    with pytest.raises(EvaluationInputError, match="--n_last_blocks 4 exceeds the backbone's 1"):
        run_linear(args)
    assert not explicit.exists()
