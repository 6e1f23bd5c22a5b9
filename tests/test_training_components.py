"""Schedules, loss, centre, head and optimiser pieces against formulas written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dino_locat.evaluation.knn import get_args_parser as knn_args_parser
from dino_locat.evaluation.splits import classification_splits
from dino_locat.models import build_backbone
from dino_locat.models.head import DINOHead, MultiCropWrapper
from dino_locat.schedules import cosine_schedule
from dino_locat.training.args import (
    DINO_DEFAULTS,
    EMBEDDED_PRESET,
    LONG_PRESET,
    STUDY_PRESET,
    get_args_parser,
    resolve_args,
)
from dino_locat.training.loss import DINOLoss
from dino_locat.training.online_knn import build_knn_probe
from dino_locat.training.optim import (
    clip_gradients_per_tensor,
    drop_last_layer_grads,
    param_groups,
    update_teacher,
)


def test_lr_schedule_warms_up_linearly_then_follows_the_cosine():
    base, final, epochs, niter, warm = 0.5e-3 * 512 / 256, 1e-6, 10, 7, 3
    values = cosine_schedule(base, final, epochs, niter, warmup_epochs=warm)
    assert len(values) == 70
    warm_iters = warm * niter  # 21 iterations: 0 -> base, both ends included
    for it in (0, 1, 10, 20):
        assert values[it] == pytest.approx(base * it / (warm_iters - 1), rel=1e-12)
    rest = epochs * niter - warm_iters
    for it in (21, 22, 40, 69):
        k = it - warm_iters
        expected = final + (base - final) * (1 + math.cos(math.pi * k / rest)) / 2
        assert values[it] == pytest.approx(expected, rel=1e-12)


def test_weight_decay_and_momentum_schedules_are_plain_cosines():
    wd = cosine_schedule(0.04, 0.4, 5, 4)
    momentum = cosine_schedule(0.996, 1.0, 5, 4)
    for it in (0, 7, 13, 19):
        angle = math.pi * it / 20
        assert wd[it] == pytest.approx(0.4 - (0.4 - 0.04) * (1 + math.cos(angle)) / 2)
        assert momentum[it] == pytest.approx(1 - (1 - 0.996) * (1 + math.cos(angle)) / 2)
    assert wd[0] == pytest.approx(0.04) and momentum[0] == pytest.approx(0.996)
    with pytest.raises(ValueError, match="warm-up"):
        cosine_schedule(1.0, 0.0, 2, 3, warmup_epochs=3)


def test_teacher_temperature_warms_up_per_epoch_then_stays():
    loss = DINOLoss(
        8, 4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=5, nepochs=12
    )
    for epoch in range(5):
        assert loss.teacher_temp(epoch) == pytest.approx(0.04 + 0.03 * epoch / 4)
    assert all(loss.teacher_temp(e) == pytest.approx(0.07) for e in range(5, 12))


def test_loss_matches_its_definition_and_centre_follows_its_ema():
    torch.manual_seed(0)
    batch, ncrops, dim = 3, 4, 16
    student = torch.randn(ncrops * batch, dim)
    teacher = torch.randn(2 * batch, dim)
    loss_fn = DINOLoss(dim, ncrops, 0.04, 0.04, 0, 10, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, dim) * 0.1)
    center_before = loss_fn.center.clone()
    value = loss_fn(student, teacher, epoch=0)
    # Independent formula: average over (teacher view a, student view b != a) of
    # mean_batch sum_k -softmax((t_a - c)/0.04)_k * log_softmax(s_b/0.1)_k.
    total, terms = 0.0, 0
    for a in range(2):
        q = F.softmax((teacher[a * batch : (a + 1) * batch] - center_before) / 0.04, dim=-1)
        for b in range(ncrops):
            if b == a:
                continue
            logp = F.log_softmax(student[b * batch : (b + 1) * batch] / 0.1, dim=-1)
            total += (-(q * logp).sum(-1)).mean().item()
            terms += 1
    assert terms == 2 * ncrops - 2
    assert value.item() == pytest.approx(total / terms, rel=1e-5)
    expected_center = 0.9 * center_before + 0.1 * teacher.mean(dim=0, keepdim=True)
    assert torch.allclose(loss_fn.center, expected_center, atol=1e-7)
    assert set(loss_fn.state_dict()) == {"center"}


def test_head_weight_norm_has_plain_keys_and_frozen_g_when_normed():
    head = DINOHead(24, 50, norm_last_layer=True, hidden_dim=32, bottleneck_dim=8)
    keys = set(head.state_dict())
    assert {"last_layer.weight_g", "last_layer.weight_v"} <= keys
    assert all(isinstance(v, torch.Tensor) for v in head.state_dict().values())
    assert not head.last_layer.weight_g.requires_grad
    assert DINOHead(24, 50, norm_last_layer=False).last_layer.weight_g.requires_grad
    x = torch.randn(5, 24)
    out = head(x)
    # With g = 1 the output is the cosine between the bottleneck code and each prototype.
    code = F.normalize(head.mlp(x), dim=-1)
    prototypes = F.normalize(head.last_layer.weight_v, dim=-1)
    assert torch.allclose(out, code @ prototypes.t(), atol=1e-6)
    assert out.abs().max() <= 1 + 1e-6


def test_multicrop_wrapper_runs_each_resolution_once_and_keeps_view_order():
    backbone = build_backbone("vit_t", img_size=32, patch_size=8, depth=1)
    model = MultiCropWrapper(backbone, DINOHead(192, 10, hidden_dim=16, bottleneck_dim=8)).eval()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    out = model(crops)
    assert out.shape == (6, 10)
    assert torch.allclose(out[4:], model(crops[2]), atol=1e-5)


def test_param_groups_clip_freeze_and_ema():
    model = MultiCropWrapper(
        build_backbone("locatvit_t", img_size=16, patch_size=8, depth=1),
        DINOHead(192, 10, hidden_dim=16, bottleneck_dim=8),
    )
    decay, no_decay = param_groups(model)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert "backbone.blocks.0.attn.qkv.weight" in decayed and "backbone.pos_embed" in decayed
    assert {"backbone.blocks.0.attn.qkv.bias", "backbone.norm.weight"} <= not_decayed
    assert all(n.endswith(".bias") or "norm" in n for n in not_decayed)
    assert no_decay["weight_decay"] == 0.0
    assert "head.last_layer.weight_g" not in decayed | not_decayed

    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    clip_gradients_per_tensor(model, 3.0)
    for name, p in model.named_parameters():
        expected = min(1.0, 3.0 / (10.0 * math.sqrt(p.numel()) + 1e-6))
        assert torch.allclose(p.grad, torch.full_like(p, 10.0 * expected), rtol=1e-5), name
    drop_last_layer_grads(model)
    assert model.head.last_layer.weight_v.grad is None and model.head.mlp[0].weight.grad is not None

    teacher = MultiCropWrapper(
        build_backbone("locatvit_t", img_size=16, patch_size=8, depth=1),
        DINOHead(192, 10, hidden_dim=16, bottleneck_dim=8),
    )
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    update_teacher(model, teacher, 0.9)
    student_state = model.state_dict()
    for key, value in teacher.state_dict().items():
        assert torch.allclose(value, 0.9 * before[key] + 0.1 * student_state[key], atol=1e-6)


def test_preset_fills_only_unset_flags_and_data_path_uses_dino_defaults():
    parser = get_args_parser()
    args, chosen = resolve_args(parser.parse_args(["--epochs", "7", "--patch_size", "4"]))
    assert args.epochs == 7 and args.patch_size == 4 and "epochs" not in chosen
    assert args.out_dim == EMBEDDED_PRESET["out_dim"] == chosen["out_dim"]
    assert args.output_dir == "output/dino_locatvit_s"
    args, chosen = resolve_args(parser.parse_args(["--data_path", "/x", "--arch", "vit_small"]))
    assert chosen == {} and args.arch == "vit_s"
    assert all(getattr(args, k) == v for k, v in DINO_DEFAULTS.items())
    assert (args.lr, args.epochs, args.out_dim, args.patch_size) == (0.0005, 100, 65536, 16)
    with pytest.raises(ValueError, match="--local_crops_size 20"):
        resolve_args(parser.parse_args(["--local_crops_size", "20"]))
    with pytest.raises(ValueError, match="--arch"):
        resolve_args(parser.parse_args(["--arch", "resnet50"]))


@pytest.mark.parametrize(("preset", "values"), [("study", STUDY_PRESET), ("long", LONG_PRESET)])
def test_named_presets_fill_their_recipe_and_refuse_data_path(preset, values):
    parser = get_args_parser()
    args, chosen = resolve_args(parser.parse_args(["--preset", preset, "--lr", "0.003"]))
    assert args.lr == 0.003 and "lr" not in chosen
    for name, value in values.items():
        if name != "lr":
            assert getattr(args, name) == value == chosen[name]
    assert values != EMBEDDED_PRESET
    with pytest.raises(ValueError, match=f"--preset {preset}"):
        resolve_args(parser.parse_args(["--preset", preset, "--data_path", "/x"]))


def test_long_preset_probes_the_published_knn_split():
    """The long run's online curve must end on eval/knn.py's own 10,000 / 2,000 split."""
    args, _ = resolve_args(get_args_parser().parse_args(["--preset", "long"]))
    probe = build_knn_probe(args)
    knn = knn_args_parser().parse_args([])
    splits = classification_splits(None, None, None, knn.train_subset, knn.test_subset)
    bank, queries = probe.splits["bank"], probe.splits["queries"]
    eval_bank = splits.train.dataset.indices[np.asarray(splits.train.indices)]
    assert len(bank) == len(eval_bank) == 10000 and len(queries) == len(splits.test) == 2000
    assert np.array_equal(bank.indices, eval_bank)
    assert np.array_equal(queries.indices, splits.test.indices)
    assert queries.targets == splits.test.targets and bank.targets == splits.train.targets
    assert "overlaps the pretraining subset" in probe.description


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "0"], "--lr must be a positive number"),
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--teacher_temp", "0"], "--teacher_temp must be a positive number"),
        (["--warmup_teacher_temp", "-0.1"], "--warmup_teacher_temp must be a positive"),
        (["--min_lr=-1e-6"], "--min_lr must be >= 0"),
        (["--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
        (["--weight_decay_end", "-0.1"], "--weight_decay_end must be >= 0"),
        (["--clip_grad", "-1"], "--clip_grad must be >= 0"),
        (["--momentum_teacher", "1.5"], r"--momentum_teacher must be in \[0, 1\]"),
        (["--momentum_teacher_end", "-0.5"], r"--momentum_teacher_end must be in \[0, 1\]"),
        (["--koleo_loss_weight", "-0.1"], "--koleo_loss_weight must be >= 0"),
        (["--drop_path_rate", "1"], "--drop_path_rate must be below 1"),
        (["--koleo_loss_weight", "0.1", "--batch_size_per_gpu", "1"], "at least 2 images"),
    ],
)
def test_flags_are_checked_up_front_naming_the_flag(flags, message):
    with pytest.raises(ValueError, match=message):
        resolve_args(get_args_parser().parse_args(flags))


def test_help_quotes_each_presets_own_value_and_the_momentum_end_flag():
    text = " ".join(get_args_parser().format_help().split())
    assert "--preset main 2, study 0" in text  # --vis_freq
    assert "cosine to the end value" in text and "cosine to 1" not in text
