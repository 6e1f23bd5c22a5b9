"""Taking a backbone away (docs/backbones.md#taking-a-backbone-away): eval/export.py,
timm's loading of the export, and every reader of ours reading it back.

The source is a training-layout checkpoint of a depth-1 LocAtViT-T (32 px, patch 8) with
non-zero GAug parameters; the data a tiny ImageNet-layout folder of real PNG/JPEG files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import write_image_folder
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn
from torch.utils.data import DataLoader

import dino_locat.models  # noqa: F401  (registers our archs with timm)
from dino_locat.checkpoint import (
    CheckpointError,
    export_backbone,
    load_checkpoint,
    load_pretrained_backbone,
    save_checkpoint,
)
from dino_locat.data.transforms import eval_transform
from dino_locat.evaluation import knn
from dino_locat.evaluation.features import extract_features, load_features, normalized_cls
from dino_locat.evaluation.splits import classification_splits
from dino_locat.models import build_backbone
from dino_locat.visualization.commands import visualize_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = {"img_size": 32, "patch_size": 8, "depth": 1}


def tiny_backbone(seed: int, arch: str = "locatvit_t") -> nn.Module:
    """A depth-1 backbone whose GAug parameters are far from their initial values."""
    torch.manual_seed(seed)
    model = build_backbone(arch, **TINY)
    with torch.no_grad():
        for block in model.blocks:
            if block.attn.gaug is not None:
                block.attn.gaug.log_alpha.bias.fill_(0.4 + 0.1 * seed)
                block.attn.gaug.log_var.bias.fill_(1.0 + 0.2 * seed)
    return model.eval()


def training_checkpoint(path: Path, teacher: nn.Module, student: nn.Module, **args) -> Path:
    """Our training checkpoint layout: backbone.* and head.* under teacher and student."""

    def wrapped(model: nn.Module) -> dict[str, torch.Tensor]:
        state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
        state["head.last_layer.weight_g"] = torch.ones(1, 8)
        return state

    base = {"arch": "locatvit_t", "patch_size": 8, "global_crops_size": 32, "depth": 1}
    state = {"teacher": wrapped(teacher), "student": wrapped(student), "epoch": 7}
    return save_checkpoint({**state, "optimizer": {}, "args": {**base, **args}}, path)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("run")
    teacher, student = tiny_backbone(1), tiny_backbone(2)
    return {
        "path": training_checkpoint(folder / "checkpoint.pth", teacher, student),
        "teacher": teacher,
        "student": student,
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """ImageNet layout: train/ and val/ with 3 classes of real image files."""
    root = tmp_path_factory.mktemp("data")
    write_image_folder(root / "train", per_class=4)
    write_image_folder(root / "val", per_class=2)
    return root


def run_export(*argv: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "eval" / "export.py"), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def knn_run(weights: Path, data: Path, out: Path, *extra: str) -> dict:
    argv = ["--pretrained_weights", str(weights), "--data_path", str(data), "--nb_knn", "3", "5"]
    argv += ["--num_workers", "0", "--output_dir", str(out / "eval"), "--dump_features", str(out)]
    return knn.run_knn(knn.get_args_parser().parse_args([*argv, *extra]))


def test_safetensors_export_gives_timm_the_features_our_evaluators_compute(source, data, tmp_path):
    exported = tmp_path / "teacher.safetensors"
    proc = run_export("--pretrained_weights", source["path"], "--output", exported)
    assert proc.returncode == 0, proc.stderr
    assert f"to {exported}" in proc.stdout
    # what eval/knn.py computes from the training checkpoint
    knn_run(source["path"], data, tmp_path / "from_checkpoint")
    features, _, _ = load_features(tmp_path / "from_checkpoint" / "test_features.pth")
    # what timm's own loading path makes of the export, on the same evaluation images
    model = timm.create_model(
        "locatvit_t",
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay={"file": str(exported)},
    ).eval()
    assert (len(model.blocks), model.patch_size, model.img_size) == (1, 8, 32)
    transform = eval_transform(32)
    splits = classification_splits(str(data), transform, transform)
    timm_features, _ = extract_features(
        model, DataLoader(splits.test, batch_size=4), normalized_cls, verbose=False
    )
    assert features.shape == (6, 192)
    torch.testing.assert_close(timm_features, features, atol=1e-6, rtol=0)
    # a classifier on top: timm keeps the backbone and makes a fresh head
    classifier = timm.create_model(
        "locatvit_t", pretrained=True, num_classes=5, pretrained_cfg_overlay={"file": str(exported)}
    )
    assert classifier.head.out_features == 5
    torch.testing.assert_close(classifier.pos_embed, source["teacher"].pos_embed)


def test_knn_reads_the_export_as_it_reads_the_checkpoint(source, data, tmp_path):
    for suffix in (".safetensors", ".pth"):
        exported = export_backbone(source["path"], tmp_path / f"teacher{suffix}")["output"]
        from_checkpoint = knn_run(source["path"], data, tmp_path / "checkpoint")
        from_export = knn_run(Path(exported), data, tmp_path / suffix[1:])
        assert from_export["knn"] == from_checkpoint["knn"]
        assert from_export["arch"] == "locatvit_t" and from_export["image_size"] == 32
        for split in ("train_features.pth", "test_features.pth"):
            ours, _, _ = load_features(tmp_path / "checkpoint" / split)
            theirs, _, _ = load_features(tmp_path / suffix[1:] / split)
            assert torch.equal(ours, theirs)
    # the .safetensors carries the source epoch into the results; a .pth cannot
    assert from_checkpoint["epoch"] == 7
    results = json.loads((tmp_path / "safetensors" / "eval" / "results.json").read_text())
    assert results["epoch"] == 7


def test_metadata_names_the_backbone_and_its_source(source, tmp_path):
    out = export_backbone(source["path"], tmp_path / "s.safetensors", checkpoint_key="student")
    with safe_open(out["output"], framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata == {
        "format": "dino_locat.backbone.v1",
        "arch": "locatvit_t",
        "patch_size": "8",
        "depth": "1",
        "img_size": "32",
        "mlp_ratio": "4.0",
        "qkv_bias": "true",
        "pos_embed_interpolation": "timm",
        "source_file": "checkpoint.pth",
        "source_sha256": hashlib.sha256(source["path"].read_bytes()).hexdigest(),
        "source_epoch": "7",
        "checkpoint_key": "student",
    }
    weights = load_file(out["output"])
    assert weights.keys() == source["student"].state_dict().keys()
    for key, value in source["student"].state_dict().items():
        assert torch.equal(weights[key], value), key


def test_keys_equal_timm_and_load_strictly_into_the_public_locatvit_layout(source, tmp_path):
    out = export_backbone(source["path"], tmp_path / "t.safetensors")["output"]
    weights = load_file(out)
    registered = timm.create_model("locatvit_t", num_classes=0, **TINY)
    assert sorted(weights) == sorted(registered.state_dict())  # safetensors sorts its keys
    # The public LocAtViT is timm's own VisionTransformer whose attention modules hold a
    # `gaug` with two linear maps from the head dim: log_var (-> 2) and log_alpha (-> 1).
    public = TimmViT(img_size=32, patch_size=8, embed_dim=192, depth=1, num_heads=3, num_classes=0)
    for block in public.blocks:
        block.attn.gaug = nn.Module()
        block.attn.gaug.log_var = nn.Linear(64, 2)
        block.attn.gaug.log_alpha = nn.Linear(64, 1)
    public.load_state_dict(weights, strict=True)
    # a plain ViT export loads into timm's plain ViT as it is
    vit = tmp_path / "vit.pth"
    torch.save(tiny_backbone(3, "vit_t").state_dict(), vit)
    vit_out = export_backbone(vit, tmp_path / "vit.safetensors")["output"]
    plain = TimmViT(img_size=32, patch_size=8, embed_dim=192, depth=1, num_heads=3, num_classes=0)
    plain.load_state_dict(load_file(vit_out), strict=True)


def test_pth_export_is_dinos_plain_backbone_state_dict(source, tmp_path):
    out = export_backbone(source["path"], tmp_path / "teacher.pth")["output"]
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert list(state) == list(source["teacher"].state_dict())
    # what DINO's evaluation scripts do with it: build the arch, load the state_dict
    model = build_backbone("locatvit_t", **TINY)
    model.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), source["teacher"](images))


@pytest.mark.parametrize(
    "prefix", ["module.backbone.", "_orig_mod.module.backbone.", "module._orig_mod.backbone."]
)
def test_ddp_and_compile_prefixes_are_stripped(source, tmp_path, prefix):
    teacher = source["teacher"]
    state = {f"{prefix}{k}": v for k, v in teacher.state_dict().items()}
    state[f"{prefix.replace('backbone.', '')}head.mlp.0.weight"] = torch.zeros(4, 192)
    torch.save({"teacher": state, "epoch": 2}, tmp_path / "wrapped.pth")
    out = export_backbone(tmp_path / "wrapped.pth", tmp_path / "wrapped.safetensors")["output"]
    weights = load_file(out)
    assert sorted(weights) == sorted(teacher.state_dict())
    assert all(torch.equal(weights[k], v) for k, v in teacher.state_dict().items())


def test_recorded_position_embedding_rule_travels_with_the_export(tmp_path):
    teacher = tiny_backbone(4)
    # a new checkpoint records its rule; an official DINO one (Namespace args) gets DINO's
    recorded = training_checkpoint(
        tmp_path / "dino_rule.pth", teacher, teacher, pos_embed_interpolation="dino"
    )
    official = tmp_path / "official.pth"
    state = {f"module.backbone.{k}": v for k, v in teacher.state_dict().items()}
    args = argparse.Namespace(arch="locatvit_t", patch_size=8)
    torch.save({"teacher": state, "args": args, "epoch": 100}, official)
    for src in (recorded, official):
        out = Path(export_backbone(src, tmp_path / f"{src.stem}.safetensors")["output"])
        with safe_open(out, framework="pt") as handle:
            assert handle.metadata()["pos_embed_interpolation"] == "dino"
        model = timm.create_model(
            "locatvit_t", pretrained=True, pretrained_cfg_overlay={"file": str(out)}
        )
        assert model.pos_embed_interpolation == "dino"
        _, info = load_pretrained_backbone(out)  # the evaluators' auto honours it
        assert info["pos_embed_interpolation"] == "dino"
        _, info = load_pretrained_backbone(out, pos_embed_interpolation="timm")
        assert info["pos_embed_interpolation"] == "timm"
        # at another size the rule matters, and timm's model follows the export's
        images = torch.randn(1, 3, 48, 40)
        ours, _ = load_pretrained_backbone(out)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(images), ours(images), atol=1e-6, rtol=0)
    # an old checkpoint (no rule recorded) keeps today's auto: timm's
    old = training_checkpoint(tmp_path / "old.pth", teacher, teacher)
    out = export_backbone(old, tmp_path / "old.safetensors")["output"]
    with safe_open(out, framework="pt") as handle:
        assert handle.metadata()["pos_embed_interpolation"] == "timm"
    # a .pth cannot carry the rule: the command says which flag to evaluate it with
    proc = run_export("--pretrained_weights", official, "--output", tmp_path / "official_bb.pth")
    assert proc.returncode == 0, proc.stderr
    assert "--pos_embed_interpolation dino" in proc.stdout


def test_timm_refuses_downloads_and_contradicting_kwargs(source, tmp_path):
    out = export_backbone(source["path"], tmp_path / "t.safetensors")["output"]
    with pytest.raises(RuntimeError, match="no weights are downloaded; pass a local file"):
        timm.create_model("locatvit_t", pretrained=True)
    overlay = {"pretrained_cfg_overlay": {"file": out}}
    with pytest.raises(ValueError, match="depth=12 contradicts .*exported with depth=1"):
        timm.create_model("locatvit_t", pretrained=True, depth=12, **overlay)
    with pytest.raises(ValueError, match="img_size=224 contradicts"):
        timm.create_model("locatvit_t", pretrained=True, img_size=224, **overlay)
    with pytest.raises(ValueError, match="holds a locatvit_t backbone: create 'locatvit_t'"):
        timm.create_model("vit_t", pretrained=True, **overlay)
    # agreeing kwargs (also timm's tuple form) are fine
    timm.create_model("locatvit_tiny", pretrained=True, img_size=(32, 32), patch_size=8, **overlay)


def test_visualize_reads_an_export(source, tmp_path):
    out = export_backbone(source["path"], tmp_path / "t.safetensors")["output"]
    image = tmp_path / "image.png"
    torch.manual_seed(0)
    Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(image)
    written = visualize_checkpoint(out, tmp_path / "figures", images=[image])
    assert written and all(path.is_file() for path in written)


def test_a_file_without_a_backbone_is_one_clear_line(tmp_path, monkeypatch, capsys):
    empty = save_checkpoint({"optimizer": {"state": {}}, "epoch": 3}, tmp_path / "opt.pth")
    not_vit = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(4)}, not_vit)
    for path, message in [(empty, "holds no backbone weights"), (not_vit, "holds no ViT backbone")]:
        with pytest.raises(CheckpointError, match=message):
            export_backbone(path, tmp_path / "x.safetensors")
        argv = ["export.py", "--pretrained_weights", str(path), "--output", str(tmp_path / "x.pth")]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(REPO / "eval" / "export.py"), run_name="__main__")
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert err.count("\n") == 1 and str(path) in err and message in err
    assert not list(tmp_path.glob("x.*")) and not list(tmp_path.glob(".x.*"))
    with pytest.raises(CheckpointError, match="name it .safetensors .* or .pth"):
        export_backbone(empty, tmp_path / "x.bin")
    assert load_checkpoint(empty)["epoch"] == 3  # the source is untouched
