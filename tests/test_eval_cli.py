"""The three evaluator CLIs end to end, as subprocesses, on tiny real data.

Checkpoints come from our own training CLI (`python -m dino_locat.training`) and from a
bare backbone state_dict; data is the embedded Fashion-MNIST, an ImageNet-style folder and
an ADE20K-style folder of real image/PNG files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dino_locat.checkpoint import load_checkpoint, load_pretrained_backbone
from dino_locat.data.transforms import eval_transform
from dino_locat.evaluation.features import linear_features, stacked_linear_features
from dino_locat.evaluation.splits import classification_splits
from dino_locat.models import build_backbone

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    if expect_ok and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def events(folder: Path) -> EventAccumulator:
    assert list((folder / "tensorboard").glob("events.out.tfevents.*")), "no event file"
    accumulator = EventAccumulator(str(folder / "tensorboard"), size_guidance={"images": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A checkpoint written by our DINO training CLI: tiny LocAtViT, one short epoch."""
    output = tmp_path_factory.mktemp("dino") / "run"
    run(
        "-m", "dino_locat.training", "--arch", "locatvit_t", "--depth", "2", "--epochs", "1",
        "--warmup_epochs", "0", "--subset", "64", "--batch_size_per_gpu", "32",
        "--out_dim", "256", "--local_crops_number", "2", "--num_workers", "0",
        "--vis_freq", "0", "--output_dir", str(output),
    )  # fmt: skip
    assert (output / "checkpoint.pth").is_file()
    return output / "checkpoint.pth"


@pytest.fixture(scope="module")
def bare_vit(tmp_path_factory) -> Path:
    """A bare state_dict of a plain ViT (no args in the file: everything from the weights)."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("bare") / "vit_t.pth"
    torch.save(build_backbone("vit_t", img_size=32, patch_size=8, depth=2).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def three_class_folder(tmp_path_factory) -> Path:
    """ImageNet layout, 3 classes told apart by colour, as real PNG files."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    for split, count in (("train", 10), ("val", 4)):
        for name, colour in colours.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                noise = rng.integers(-25, 25, (40, 40, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def ade_folder(tmp_path_factory) -> Path:
    """ADE20K layout: JPEG images and index PNGs (0 = other, ignored)."""
    root = tmp_path_factory.mktemp("ade")
    rng = np.random.default_rng(1)
    for split, count in (("training", 6), ("validation", 3)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(count):
            mask = np.zeros((36, 48), dtype=np.uint8)
            mask[:, 16:] = 1 + i % 3
            mask[20:, :] = 5
            pixels = (mask[..., None] * 40 + rng.integers(0, 20, (36, 48, 3))).astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / split / f"ADE_{i}.jpg")
            Image.fromarray(mask).save(root / "annotations" / split / f"ADE_{i}.png")
    return root


def test_knn_from_training_checkpoint_dump_and_load_features(trained, tmp_path):
    out, feats = tmp_path / "knn", tmp_path / "features"
    common = ["--output_dir", str(out), "--num_workers", "0", "--nb_knn", "10", "20", "100", "200"]
    result = run(
        "eval/knn.py", "--pretrained_weights", str(trained), "--train_subset", "300",
        "--test_subset", "100", "--dump_features", str(feats), *common,
    )  # fmt: skip
    assert "10-NN  top-1" in result.stdout and "eta" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["arch"] == "locatvit_t" and results["num_classes"] == 10
    assert (results["train_size"], results["test_size"], results["image_size"]) == (300, 100, 32)
    assert set(results["knn"]) == {"10", "20", "100", "200"}
    for values in results["knn"].values():
        assert 0 <= values["top1"] <= values["top5"] <= 100
    scalars = events(out).Tags()["scalars"]
    assert {"knn/top1_k10", "knn/top5_k200"} <= set(scalars)
    # Same numbers from the dumped features, without any backbone.
    again = tmp_path / "again"
    run("eval/knn.py", "--load_features", str(feats), *common[2:], "--output_dir", str(again))
    assert json.loads((again / "results.json").read_text())["knn"] == results["knn"]


def test_knn_image_folder_with_three_classes_from_bare_state_dict(bare_vit, three_class_folder):
    out = three_class_folder.parent / "knn_out"
    result = run(
        "eval/knn.py", "--pretrained_weights", str(bare_vit), "--arch", "vit_t",
        "--data_path", str(three_class_folder), "--output_dir", str(out), "--num_workers", "0",
    )  # fmt: skip
    assert "k=200 exceeds the 30 training features; using k=30" in result.stdout
    assert "top-5 accuracy is not reported" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["num_classes"] == 3 and results["test_size"] == 12
    assert results["knn"]["10"]["top5"] is None and results["knn"]["200"]["k_used"] == 30
    assert results["knn"]["10"]["top1"] > 60  # colour is easy even for random weights


def test_linear_chooses_on_held_out_data_and_tests_once(trained, tmp_path):
    out = tmp_path / "linear"
    result = run(
        "eval/linear.py", "--pretrained_weights", str(trained), "--train_subset", "256",
        "--test_subset", "128", "--epochs", "2", "--lrs", "0.01", "0.3",
        "--n_last_blocks", "1", "2", "--output_dir", str(out), "--num_workers", "0",
    )  # fmt: skip
    assert "headline: test top-1" in result.stdout and "DINO protocol: test top-1" in result.stdout
    results = json.loads((out / "results.json").read_text())
    heads = results["heads_held_out"]
    assert len(heads) == 8  # 2 n_last_blocks x 2 avgpool x 2 lrs, trained together
    assert "held out for selection" in results["data"] and "trained on" in results["data"]
    headline, protocol = results["headline"], results["dino_protocol"]
    assert headline["val_top1"] == max(h["val_top1"] for h in heads)
    assert (protocol["n_last_blocks"], protocol["avgpool_patchtokens"]) == (1, False)  # LocAtViT
    protocol_heads = [h for h in heads if h["name"].startswith("n1_pool0_")]
    assert protocol["val_top1"] == max(h["val_top1"] for h in protocol_heads)
    scalars = set(events(out).Tags()["scalars"])
    assert {"linear/val_top1/best", "linear/test_top1/selected"} <= scalars
    # The saved headline head reproduces its reported test accuracy on the test images.
    saved = load_checkpoint(out / "linear_head.pth")
    spec = saved["spec"]
    model, info = load_pretrained_backbone(trained)
    splits = classification_splits(None, None, eval_transform(info["image_size"]), 256, 128)
    images = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    labels = torch.tensor([splits.test[i][1] for i in range(len(splits.test))])
    head = torch.nn.Linear(*reversed(saved["head"]["weight"].shape))
    head.load_state_dict(saved["head"])
    with torch.no_grad():
        stacked = stacked_linear_features(model, images, spec["n_last_blocks"])
        logits = head(linear_features(stacked, spec["n_last_blocks"], spec["avgpool_patchtokens"]))
    top1 = 100.0 * float((logits.argmax(1) == labels).float().mean())
    assert top1 == pytest.approx(saved["test"]["top1"]) == pytest.approx(headline["test_top1"])


def test_linear_augmented_on_image_folder_from_bare_state_dict(bare_vit, three_class_folder):
    out = three_class_folder.parent / "linear_out"
    result = run(
        "eval/linear.py", "--pretrained_weights", str(bare_vit), "--data_path",
        str(three_class_folder), "--epochs", "1", "--n_last_blocks", "2",
        "--avgpool_patchtokens", "true", "--lrs", "0.1", "--output_dir", str(out),
        "--num_workers", "0", "--batch_size_per_gpu", "8",
    )  # fmt: skip
    assert "recomputed every pass" in result.stdout  # augmented: backbone every epoch
    results = json.loads((out / "results.json").read_text())
    assert results["augment"] is True and results["num_classes"] == 3
    assert results["headline"]["name"] == "n2_pool1_lr0.1"
    assert results["headline"]["test_top5"] is None
    # ViT-T of depth 2: DINO's ViT-S head (last 4 blocks) clipped to 2 blocks, no pooling.
    assert results["dino_protocol"]["name"] == "n2_pool0_lr0.1"
    assert "adding the DINO-protocol variant" in result.stdout


def test_segmentation_scenes_from_training_checkpoint(trained, tmp_path):
    out = tmp_path / "segmentation"
    result = run(
        "eval/segmentation.py", "--pretrained_weights", str(trained), "--train_scenes", "48",
        "--test_scenes", "12", "--epochs", "2", "--output_dir", str(out), "--num_workers", "0",
    )  # fmt: skip
    assert "mIoU" in result.stdout and "Ankle boot" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"] == "fast" and results["comparable_with_paper"] is False
    assert results["image_size"] == 64 and results["num_classes"] == 11
    assert len(results["per_class_iou"]) == 11 and 0 <= results["mIoU"] <= 100
    present = [v for v in results["per_class_iou"].values() if v is not None]
    assert results["mIoU"] == pytest.approx(sum(present) / len(present))
    accumulator = events(out)
    assert "segmentation/image_truth_prediction" in accumulator.Tags()["images"]
    picture = accumulator.Images("segmentation/image_truth_prediction")[0]
    assert (picture.width, picture.height) == (3 * 64, 4 * 64)  # image | truth | prediction
    assert load_checkpoint(out / "segmentation_head.pth")["classes"][0] == "background"


def test_segmentation_paper_protocol_from_training_checkpoint(trained, tmp_path):
    out = tmp_path / "paper"
    result = run(
        "eval/segmentation.py", "--pretrained_weights", str(trained), "--protocol", "paper",
        "--train_scenes", "16", "--test_scenes", "4", "--iterations", "6", "--crop_size", "32",
        "--train_scale", "64", "32", "--test_scale", "64", "48", "--batch_size_per_gpu", "4",
        "--output_dir", str(out), "--num_workers", "0",
    )  # fmt: skip
    assert "paper protocol: 6 iterations at batch 4, crops 32" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"] == "paper" and results["comparable_with_paper"] is False
    assert (results["iterations"], results["crop_size"], results["weight_decay"]) == (6, 32, 0.01)
    assert results["test_scale"] == [64, 48] and results["num_classes"] == 11
    for name in ("mIoU", "mAcc", "aAcc"):
        assert 0 <= results[name] <= 100
    head = load_checkpoint(out / "segmentation_head.pth")
    assert head["protocol"] == "paper" and "0.bias" not in head["head"]


def test_segmentation_ade20k_folder_from_bare_state_dict(bare_vit, ade_folder):
    out = ade_folder.parent / "seg_out"
    result = run(
        "eval/segmentation.py", "--pretrained_weights", str(bare_vit), "--data_path",
        str(ade_folder), "--epochs", "3", "--image_size", "32", "--output_dir", str(out),
        "--num_workers", "0", "--augment", "true",
    )  # fmt: skip
    assert "ade20k folder" in result.stdout and "recomputed every epoch" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["num_classes"] == 150
    # Masks hold file labels 1, 2, 3, 5 -> classes 0, 1, 2, 4; everything else never occurs.
    occurring = {k for k, v in results["per_class_iou"].items() if v is not None}
    assert {"class_000", "class_001", "class_002", "class_004"} <= occurring


def test_hummingbird_scenes_from_training_checkpoint(trained, tmp_path):
    out = tmp_path / "hummingbird"
    common = [
        "--pretrained_weights", str(trained), "--train_scenes", "24", "--test_scenes", "6",
        "--input_size", "32", "--num_workers", "0", "--batch_size_per_gpu", "8",
    ]  # fmt: skip
    result = run("eval/hummingbird.py", *common, "--output_dir", str(out))
    assert "Hummingbird mIoU" in result.stdout and "Ankle boot" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert (results["input_size"], results["num_classes"], results["num_neighbors"]) == (32, 11, 30)
    assert results["memory"]["capacity"] == 24 * 16  # 24 scenes x (32 / 8)^2 patches
    assert results["memory"]["patches"] == 24 * 16 - results["memory"]["unlabelled_patches_skipped"]
    present = [v for v in results["per_class_iou"].values() if v is not None]
    assert results["mIoU"] == pytest.approx(sum(present) / len(present))
    assert "hummingbird/mIoU" in events(out).Tags()["scalars"]
    capped = run(
        "eval/hummingbird.py", *common, "--memory_size", "100", "--augmentation_epochs", "2",
        "--output_dir", str(tmp_path / "capped"),
    )  # fmt: skip
    memory = json.loads((tmp_path / "capped" / "results.json").read_text())["memory"]
    assert memory["patches_per_image"] == 2 and memory["patches"] <= 100
    assert "augmentation epoch(s)" in capped.stdout and "memory pass 2/2" in capped.stdout


@pytest.mark.parametrize(
    "script", ["eval/knn.py", "eval/linear.py", "eval/segmentation.py", "eval/hummingbird.py"]
)
def test_wrong_arch_for_the_checkpoint_is_a_clear_error(script, trained):
    result = run(script, "--pretrained_weights", str(trained), "--arch", "vit_s", expect_ok=False)
    assert result.returncode != 0
    assert "--arch vit_s contradicts" in result.stderr and "locatvit_t" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_inputs_are_clear_errors(tmp_path, bare_vit):
    result = run("eval/knn.py", expect_ok=False)
    assert result.returncode != 0 and "--pretrained_weights" in result.stderr
    result = run(
        "eval/segmentation.py", "--pretrained_weights", str(bare_vit), "--data_path",
        str(tmp_path), expect_ok=False,
    )  # fmt: skip
    assert result.returncode != 0 and "matches no segmentation layout" in result.stderr
    assert "Traceback" not in result.stderr


def test_raw_pixel_baselines_of_the_linear_and_dense_evaluators(three_class_folder, ade_folder):
    out = three_class_folder.parent / "raw_linear"
    run(
        "eval/linear.py", "--raw_pixels", "--image_size", "32", "--data_path",
        str(three_class_folder), "--epochs", "3", "--lrs", "0.1", "--output_dir", str(out),
        "--num_workers", "0", "--batch_size_per_gpu", "8",
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert (results["arch"], results["checkpoint"], results["n_last_blocks"]) == (
        "raw_pixels", None, [1])  # fmt: skip
    assert results["headline"]["test_top1"] == 100.0  # the classes differ by colour alone
    for script in ("eval/segmentation.py", "eval/hummingbird.py"):
        out = ade_folder.parent / f"raw_{Path(script).stem}"
        result = run(
            script, "--raw_pixels", "--patch_size", "8", "--image_size", "32", "--data_path",
            str(ade_folder), "--output_dir", str(out), "--num_workers", "0",
            *(["--epochs", "3"] if "segmentation" in script else []),
        )  # fmt: skip
        assert "raw pixels (the baseline; nothing loaded), 8 x 8 pixel patches" in result.stdout
        results = json.loads((out / "results.json").read_text())
        assert results["arch"] == "raw_pixels" and 0 < results["mIoU"] <= 100
    result = run("eval/linear.py", "--data_path", str(three_class_folder), expect_ok=False)
    assert result.returncode != 0 and "give --pretrained_weights" in result.stderr
    assert "Traceback" not in result.stderr
