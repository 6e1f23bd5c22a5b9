"""ViT / LocAtViT backbones: registry, sizes, parameter budget, fidelity of the API."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from dino_locat.models import ARCH_NAMES, build_backbone, canonical_arch


def test_all_names_are_registered_with_timm():
    for name in ARCH_NAMES:
        assert name in timm.list_models(name)
    model = timm.create_model("locatvit_small", img_size=32, patch_size=8, depth=1)
    assert model.locality and model.embed_dim == 384 and model.num_heads == 6
    assert canonical_arch("locatvit_base") == "locatvit_b"
    with pytest.raises(ValueError, match="unknown arch"):
        build_backbone("vit_huge")


@pytest.mark.parametrize("size", ["t", "s", "b"])
def test_locatvit_adds_exactly_2340_parameters(size):
    def count(model):
        return sum(p.numel() for p in model.parameters())

    assert count(build_backbone(f"locatvit_{size}")) - count(build_backbone(f"vit_{size}")) == 2340


def test_state_dict_names_follow_timm():
    model = build_backbone("locatvit_t", depth=2)
    keys = set(model.state_dict())
    for i in range(2):
        for suffix in ("weight", "bias"):
            assert f"blocks.{i}.attn.gaug.log_var.{suffix}" in keys
            assert f"blocks.{i}.attn.gaug.log_alpha.{suffix}" in keys
            assert f"blocks.{i}.attn.qkv.{suffix}" in keys
            assert f"blocks.{i}.mlp.fc1.{suffix}" in keys
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"} <= keys
    assert model.state_dict()["blocks.0.attn.gaug.log_var.weight"].shape == (2, 64)
    assert model.state_dict()["blocks.0.attn.gaug.log_alpha.weight"].shape == (1, 64)
    # a timm-created classifier's weights load strictly into our model
    timm_model = timm.create_model("locatvit_t", depth=2, num_classes=1000)
    model.load_state_dict(
        {k: v for k, v in timm_model.state_dict().items() if not k.startswith("head.")}
    )


@pytest.mark.parametrize("patch_size,img_size", [(16, 64), (8, 32), (4, 16)])
def test_patch_sizes(patch_size, img_size):
    model = build_backbone("locatvit_t", patch_size=patch_size, img_size=img_size, depth=2).eval()
    tokens, grid = model.get_patch_tokens(torch.randn(2, 3, img_size, 2 * img_size))
    assert grid == (img_size // patch_size, 2 * img_size // patch_size)
    assert tokens.shape == (2, grid[0] * grid[1], 192)
    assert model(torch.randn(1, 3, img_size, img_size)).shape == (1, 192)


def test_non_multiple_input_is_a_clear_error():
    model = build_backbone("vit_t", patch_size=8, img_size=32, depth=1)
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        model(torch.randn(1, 3, 30, 32))


@pytest.mark.parametrize("arch", ["locatvit_t", "vit_t"])
def test_mixed_resolutions_equal_fresh_forwards(arch):
    torch.manual_seed(0)
    model = build_backbone(arch, depth=2).eval()
    small, large = torch.randn(2, 3, 96, 96), torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        first = model(small)
        middle = model(large)
        last = model(small)
        fresh_large = copy.deepcopy(model)(large)
        fresh_small = copy.deepcopy(model)(small)
        inter = model.get_intermediate_layers(small, n=2)
        inter_large = model.get_intermediate_layers(large, n=1)
    torch.testing.assert_close(first, fresh_small)
    torch.testing.assert_close(last, fresh_small)
    torch.testing.assert_close(middle, fresh_large)
    torch.testing.assert_close(inter[-1][:, 0], fresh_small)
    torch.testing.assert_close(inter_large[-1][:, 0], fresh_large)
    assert inter[0].shape == (2, 37, 192)


def test_gradients_reach_every_gaug_parameter():
    torch.manual_seed(0)
    model = build_backbone("locatvit_t", img_size=32, patch_size=8, drop_path_rate=0.1).train()
    model(torch.randn(3, 3, 32, 32)).pow(2).sum().backward()
    gaug_params = {n: p for n, p in model.named_parameters() if ".gaug." in n}
    assert len(gaug_params) == 4 * 12
    for name, param in gaug_params.items():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_inference_mode_first_then_training():
    model = build_backbone("locatvit_t", img_size=24, patch_size=8, depth=1)
    image = torch.randn(2, 3, 40, 40)  # a grid no other test uses, so no cache is warm
    with torch.inference_mode():
        model(image)
    model(image).sum().backward()
    assert model.blocks[0].attn.gaug.log_var.weight.grad is not None


def test_gaug_statistics_on_request():
    model = build_backbone("locatvit_t", img_size=32, patch_size=8, depth=3).eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        assert model.gaug_statistics() == []  # nothing kept unless asked
        with model.recording_gaug():
            model(torch.randn(2, 3, 32, 32))
    stats = model.gaug_statistics()
    assert len(stats) == 3
    assert stats[0]["var"].shape == (2, 3, 16, 2) and stats[0]["alpha"].shape == (2, 3, 16)
    assert torch.isclose(stats[0]["var_mean"], stats[0]["var"].mean())
    assert not model.blocks[0].attn.gaug.record


def test_forward_makes_no_host_sync(monkeypatch):
    """Every way a tensor could be read on the host raises inside forward/backward."""
    model = build_backbone("locatvit_t", img_size=32, patch_size=8, depth=2, drop_path_rate=0.1)
    images = [torch.randn(2, 3, 32, 32), torch.randn(4, 3, 16, 16)]

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside forward")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    model.train()
    loss = sum(model(x).sum() for x in images)
    loss.backward()
    with model.recording_gaug():
        model(images[0])
    model.eval()
    with torch.no_grad():
        model(images[1])
        model.get_intermediate_layers(images[0], n=2)
        model.get_patch_tokens(images[0])
        model.get_attention_maps(images[0])


# (height, width) in pixels: the sizes of the issue, and non-square inputs.
RESAMPLE_SIZES = [(96, 96), (160, 160), (224, 224), (448, 448), (160, 96), (96, 224)]


@pytest.mark.parametrize("height, width", RESAMPLE_SIZES)
def test_timm_weights_give_timm_outputs_at_every_size(height, width):
    """Our ViT and timm's own VisionTransformer, same weights, any input size: same tokens."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(0)
    ours = build_backbone("vit_t", img_size=224, patch_size=16, depth=1).eval()
    with torch.no_grad():
        ours.pos_embed.normal_()  # a rough embedding, so that the resampling rule shows
    theirs = TimmViT(
        img_size=224, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=0,
        dynamic_img_size=True,
    ).eval()  # fmt: skip
    theirs.load_state_dict(ours.state_dict(), strict=True)
    image = torch.randn(2, 3, height, width)
    with torch.no_grad():
        ours_out, theirs_out = ours.forward_features(image), theirs.forward_features(image)
    torch.testing.assert_close(ours_out, theirs_out, rtol=0, atol=2e-5)
    grid = (height // 16, width // 16)
    if grid != (14, 14):  # the rule matters: plain bicubic (no antialias) is visibly off
        native = ours.pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
        plain = torch.nn.functional.interpolate(native, size=grid, mode="bicubic")
        resampled = ours.interpolate_pos_embed(grid)[:, 1:]
        assert (plain.flatten(2).transpose(1, 2) - resampled).abs().max() > 1e-2


@pytest.mark.parametrize("height, width", RESAMPLE_SIZES)
def test_dino_rule_samples_at_n_plus_a_tenth_over_n0(height, width):
    model = build_backbone("locatvit_t", img_size=224, patch_size=16, depth=1)
    model.pos_embed_interpolation = "dino"
    grid = (height // 16, width // 16)
    out = model.interpolate_pos_embed(grid)
    assert out.shape == (1, 1 + grid[0] * grid[1], 192)
    assert torch.equal(out[:, 0], model.pos_embed[:, 0])
    native = model.pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    if grid == (14, 14):
        assert out is model.pos_embed
        return
    scaled = torch.nn.functional.interpolate(
        native, scale_factor=((grid[0] + 0.1) / 14, (grid[1] + 0.1) / 14), mode="bicubic"
    )
    assert torch.equal(out[:, 1:], scaled.flatten(2).transpose(1, 2))
    model.pos_embed_interpolation = "timm"
    assert not torch.allclose(model.interpolate_pos_embed(grid), out, atol=1e-4)


def test_unknown_pos_embed_rule_is_a_clear_error():
    with pytest.raises(ValueError, match="pos_embed_interpolation 'nearest': choose from timm"):
        build_backbone(
            "vit_t", img_size=32, patch_size=8, depth=1, pos_embed_interpolation="nearest"
        )
