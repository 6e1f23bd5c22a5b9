"""load_pretrained_backbone: every accepted checkpoint layout, and clear errors for bad flags;
the raw-pixel baseline in a backbone's shape."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch

from dino_locat.checkpoint import (
    CheckpointError,
    load_pretrained_backbone,
    plain_args,
    save_checkpoint,
)
from dino_locat.evaluation.backbone import RawPixels, frozen_backbone
from dino_locat.evaluation.options import EvaluationInputError
from dino_locat.models import build_backbone


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = build_backbone("locatvit_t", img_size=32, patch_size=8, depth=2).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return model, images, model(images)


def assert_same_outputs(model, reference):
    _, images, expected = reference
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected)


def training_state(model, prefix="backbone."):
    state = {f"{prefix}{k}": v for k, v in model.state_dict().items()}
    state[f"{prefix.replace('backbone.', '')}head.last_layer.weight_g"] = torch.ones(1, 8)
    return state


def test_our_checkpoint_takes_arch_patch_depth_and_size_from_it(tmp_path, reference):
    model = reference[0]
    student = build_backbone("locatvit_t", img_size=32, patch_size=8, depth=2)
    args = {"arch": "locatvit_tiny", "patch_size": 8, "global_crops_size": 32, "depth": 2}
    save_checkpoint(
        {"teacher": training_state(model), "student": training_state(student), "epoch": 3,
         "args": plain_args(args)},
        tmp_path / "run" / "checkpoint.pth",
    )  # fmt: skip
    loaded, info = load_pretrained_backbone(tmp_path / "run")  # the output_dir works too
    assert_same_outputs(loaded, reference)
    assert (info["arch"], info["patch_size"], info["depth"]) == ("locatvit_t", 8, 2)
    assert (info["image_size"], info["epoch"], info["checkpoint_key"]) == (32, 3, "teacher")
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    student_model, _ = load_pretrained_backbone(
        tmp_path / "run" / "checkpoint.pth", checkpoint_key="student", image_size=48
    )
    torch.testing.assert_close(student_model.pos_embed, student.pos_embed)
    _, info = load_pretrained_backbone(tmp_path / "run", arch="locatvit_t", image_size=48)
    assert info["image_size"] == 48


def test_bare_state_dict_and_official_dino_layout(tmp_path, reference):
    model = reference[0]
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    loaded, info = load_pretrained_backbone(tmp_path / "bare.pth")
    assert_same_outputs(loaded, reference)
    assert info["image_size"] == 32 and info["epoch"] is None
    # Official DINO: args is an argparse.Namespace, DDP's "module." before "backbone.".
    official = {
        "teacher": training_state(model, prefix="module.backbone."),
        "args": argparse.Namespace(arch="locatvit_t", patch_size=8),
        "epoch": 100,
    }
    torch.save(official, tmp_path / "official.pth")
    loaded, info = load_pretrained_backbone(tmp_path / "official.pth", arch="locatvit_t")
    assert_same_outputs(loaded, reference)


def test_timm_state_dict_with_classifier(tmp_path, reference):
    model = reference[0]
    timm_model = timm.create_model("locatvit_t", img_size=32, patch_size=8, depth=2, num_classes=5)
    state = timm_model.state_dict()
    state.update(model.state_dict())  # same backbone, plus timm's classifier "head."
    assert any(k.startswith("head.") for k in state)
    torch.save({"state_dict": state}, tmp_path / "timm.pth")
    loaded, _ = load_pretrained_backbone(tmp_path / "timm.pth")
    assert_same_outputs(loaded, reference)


def test_wrong_flags_are_clear_errors(tmp_path, reference):
    model = reference[0]
    save_checkpoint(
        {"teacher": training_state(model), "args": {"arch": "locatvit_t", "patch_size": 8}},
        tmp_path / "ours.pth",
    )
    with pytest.raises(CheckpointError, match="--arch vit_s contradicts .*locatvit_t"):
        load_pretrained_backbone(tmp_path / "ours.pth", arch="vit_s")
    with pytest.raises(CheckpointError, match="--patch_size 16 contradicts"):
        load_pretrained_backbone(tmp_path / "ours.pth", patch_size=16)
    with pytest.raises(CheckpointError, match="--arch: unknown arch"):
        load_pretrained_backbone(tmp_path / "ours.pth", arch="resnet50")
    with pytest.raises(CheckpointError, match="--image_size 30 is not a multiple"):
        load_pretrained_backbone(tmp_path / "ours.pth", image_size=30)
    with pytest.raises(CheckpointError, match="'student' is not in .*ours.pth"):
        load_pretrained_backbone(tmp_path / "ours.pth", checkpoint_key="student")
    # A bare state_dict has no args: the weights themselves expose a wrong --arch.
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match="--arch vit_t does not fit the weights"):
        load_pretrained_backbone(tmp_path / "bare.pth", arch="vit_t")
    with pytest.raises(CheckpointError, match="--arch locatvit_s does not fit"):
        load_pretrained_backbone(tmp_path / "bare.pth", arch="locatvit_s")
    # Args that contradict the weights they came with.
    save_checkpoint(
        {"teacher": training_state(model), "args": {"arch": "vit_t", "patch_size": 8}},
        tmp_path / "inconsistent.pth",
    )
    with pytest.raises(CheckpointError, match="args say arch=vit_t but its weights are"):
        load_pretrained_backbone(tmp_path / "inconsistent.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained_backbone(tmp_path / "missing.pth")


def test_dino_trained_checkpoints_get_dinos_pos_embed_rule_unless_forced(tmp_path, reference):
    model = reference[0]
    dino = {
        "teacher": training_state(model, prefix="module.backbone."),
        "args": argparse.Namespace(arch="locatvit_t", patch_size=8, dist_url="env://"),
    }
    torch.save(dino, tmp_path / "dino.pth")
    ours = {"teacher": training_state(model), "args": {"arch": "locatvit_t", "patch_size": 8}}
    save_checkpoint(ours, tmp_path / "ours.pth")
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    images = torch.randn(1, 3, 48, 48)  # a 6x6 grid: the embedding is resampled from 4x4
    outputs = {}
    for name, forced, expected in [
        ("dino", "auto", "dino"),
        ("ours", "auto", "timm"),
        ("bare", "auto", "timm"),
        ("dino", "timm", "timm"),
        ("ours", "dino", "dino"),
    ]:
        loaded, info = load_pretrained_backbone(
            tmp_path / f"{name}.pth", image_size=48, pos_embed_interpolation=forced
        )
        assert loaded.pos_embed_interpolation == info["pos_embed_interpolation"] == expected
        with torch.no_grad():
            outputs[name, forced] = loaded(images)
    torch.testing.assert_close(outputs["dino", "timm"], outputs["ours", "auto"])
    torch.testing.assert_close(outputs["ours", "dino"], outputs["dino", "auto"])
    assert not torch.allclose(outputs["dino", "auto"], outputs["ours", "auto"], atol=1e-4)


def test_raw_pixels_are_patch_tokens_with_their_mean_as_cls():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    tokens, grid = RawPixels(4).get_patch_tokens(images)
    assert grid == (2, 2) and tokens.shape == (2, 4, 3 * 4 * 4)
    # token 1 = top-right patch, its values channel by channel, row by row
    torch.testing.assert_close(tokens[1, 1], images[1, :, :4, 4:].reshape(-1))
    (block,) = RawPixels(4).get_intermediate_layers(images)
    torch.testing.assert_close(block[:, 0], tokens.mean(dim=1))
    torch.testing.assert_close(block[:, 1:], tokens)
    # one patch covering the image: the CLS is the flattened image
    (whole,) = RawPixels(8).get_intermediate_layers(images)
    torch.testing.assert_close(whole[:, 0], images.flatten(1))
    with pytest.raises(EvaluationInputError, match="one block"):
        RawPixels(4).get_intermediate_layers(images, 2)


def test_raw_pixel_backbone_flags_are_checked():
    def args(**flags):
        base = {"raw_pixels": True, "pretrained_weights": None, "image_size": None,
                "patch_size": None}  # fmt: skip
        return argparse.Namespace(**{**base, **flags})

    model, info = frozen_backbone(args(image_size=32, patch_size=8), torch.device("cpu"))
    assert isinstance(model, RawPixels)
    assert (info["arch"], info["depth"], info["embed_dim"], info["patch_size"]) == (
        "raw_pixels", 1, 192, 8)  # fmt: skip
    _, info = frozen_backbone(args(), torch.device("cpu"), image_size=16)  # the protocol's size
    assert (info["image_size"], info["patch_size"], info["embed_dim"]) == (16, 16, 768)
    with pytest.raises(EvaluationInputError, match="--raw_pixels needs --image_size"):
        frozen_backbone(args(), torch.device("cpu"))
    with pytest.raises(EvaluationInputError, match="--image_size 30 is not a multiple of"):
        frozen_backbone(args(image_size=30, patch_size=8), torch.device("cpu"))
    with pytest.raises(EvaluationInputError, match="exclude each other"):
        frozen_backbone(args(image_size=32, pretrained_weights="x.pth"), torch.device("cpu"))
    with pytest.raises(EvaluationInputError, match="give --pretrained_weights"):
        frozen_backbone(args(raw_pixels=False), torch.device("cpu"))
