"""ViT and LocAtViT backbones, registered with timm.

Design: docs/architecture.md#the-backbone.

Parameter names follow timm's VisionTransformer (``blocks.{i}.attn.qkv``,
``blocks.{i}.attn.gaug.log_var`` ...) so that public timm LocAtViT state_dicts load with
``strict=True``. The patch grid is read off every input, never stored, so one model serves
224-px global crops, 96-px local crops and any evaluation size in any order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    register_model,
    resolve_pretrained_cfg,
)
from torch import Tensor, nn

from dino_locat.models.biased_attention import gaussian_biased_attention
from dino_locat.models.locality import GAug, dense_bias, patch_representation_refinement

Grid = tuple[int, int]
# How the position embedding is resampled to another patch grid:
#   timm: bicubic with antialias to the target size (timm.layers.resample_abs_pos_embed), so
#         timm weights give timm's outputs at every input size;
#   dino: DINO's own rule, bicubic without antialias at scale factor (n + 0.1) / n0 per axis,
#         the numbers that checkpoints trained with DINO's code were evaluated with.
POS_EMBED_INTERPOLATIONS = ("timm", "dino")


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample during training."""

    def __init__(self, prob: float = 0.0) -> None:
        super().__init__()
        self.prob = prob

    def forward(self, x: Tensor) -> Tensor:
        if self.prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens; returns the tokens and the grid they came from."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> tuple[Tensor, Grid]:
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of the patch size {self.patch_size}"
            )
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention, optionally with the GAug locality bias.

    Two paths give the same numbers: the fast one (fused SDPA, or our bias-aware kernel
    when the bias needs a gradient) and an explicit one that also returns the attention
    probabilities, for visualisation.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, native_grid: Grid | None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.gaug = GAug(self.head_dim, native_grid) if native_grid is not None else None

    def split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as (B, H, N, d); q contiguous, as GAug and our kernel both keep it."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q.contiguous(), k, v

    def gaussian_params(self, x: Tensor, grid: Grid) -> tuple[Tensor, Tensor]:
        """Per head and patch query: var (B, H, Np, 2) and alpha (B, H, Np), float32."""
        return self.gaug(self.split_heads(x)[0], grid)

    def gaussian_bias(self, x: Tensor, grid: Grid) -> Tensor:
        """The dense (B, H, N, N) float32 GAug bias for input tokens ``x``."""
        var, alpha = self.gaussian_params(x, grid)
        return dense_bias(var, alpha, grid, self.gaug.clamp, self.gaug.eps, x.shape[1])

    def forward(
        self, x: Tensor, grid: Grid, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        b, n, dim = x.shape
        q, k, v = self.split_heads(x)
        bias = None
        if self.gaug is not None:
            var, alpha = self.gaug(q, grid)
            needs_grad = torch.is_grad_enabled() and (q.requires_grad or var.requires_grad)
            if needs_grad and not return_attention:
                out = gaussian_biased_attention(
                    q, k, v, var, alpha, grid, self.gaug.clamp, self.gaug.eps, self.scale
                )
                return self.proj(out.transpose(1, 2).reshape(b, n, dim))
            bias = dense_bias(var, alpha, grid, self.gaug.clamp, self.gaug.eps, n)
        attn = None
        if return_attention:
            logits = torch.matmul(q, k.transpose(-1, -2)).float() * self.scale
            if bias is not None:
                logits = logits + bias
            attn = logits.softmax(dim=-1)
            out = torch.matmul(attn.to(v.dtype), v)
        else:
            mask = None if bias is None else bias.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.proj(out.transpose(1, 2).reshape(b, n, dim))
        return (out, attn) if return_attention else out


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: float,
        native_grid: Grid | None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, native_grid)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self, x: Tensor, grid: Grid, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        if return_attention:
            y, attn = self.attn(self.norm1(x), grid, return_attention=True)
        else:
            y, attn = self.attn(self.norm1(x), grid), None
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, attn) if return_attention else x


class VisionTransformer(nn.Module):
    """A ViT; with ``locality=True`` a LocAtViT (GAug in every block, PRR after the norm)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 0,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        locality: bool = False,
        pos_embed_interpolation: str = "timm",
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
            raise ValueError(
                f"pos_embed_interpolation {pos_embed_interpolation!r}: choose from "
                f"{', '.join(POS_EMBED_INTERPOLATIONS)}"
            )
        self.pos_embed_interpolation = pos_embed_interpolation
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.locality = locality
        self.num_prefix_tokens = 1
        self.native_grid: Grid = (img_size // patch_size, img_size // patch_size)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            torch.zeros(1, 1 + self.native_grid[0] * self.native_grid[1], embed_dim)
        )
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        grid = self.native_grid if locality else None
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rate, grid) for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # -- tokens -------------------------------------------------------------------------
    def interpolate_pos_embed(self, grid: Grid) -> Tensor:
        """Positional embedding for ``grid``, resampled from the native patch grid by the rule
        in ``pos_embed_interpolation`` (see ``POS_EMBED_INTERPOLATIONS``); shapes only, no
        host sync."""
        if grid == self.native_grid:
            return self.pos_embed
        if self.pos_embed_interpolation == "timm":
            return resample_abs_pos_embed(
                self.pos_embed, list(grid), list(self.native_grid), self.num_prefix_tokens
            )
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        h0, w0 = self.native_grid
        patch_pos = patch_pos.reshape(1, h0, w0, -1).permute(0, 3, 1, 2)
        # DINO's rule: +0.1 so that floor(n0 * scale) is n despite rounding; the kernel then
        # samples at this scale, not at n / n0.
        scale = ((grid[0] + 0.1) / h0, (grid[1] + 0.1) / w0)
        patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic")
        return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)

    def prepare_tokens(self, x: Tensor) -> tuple[Tensor, Grid]:
        tokens, grid = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.interpolate_pos_embed(grid)
        return tokens, grid

    def finalize(self, x: Tensor) -> Tensor:
        """Final norm, then PRR for LocAtViT: what every output token goes through."""
        x = self.norm(x)
        if self.locality:
            x = patch_representation_refinement(x, self.num_heads)
        return x

    # -- public API ---------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        """All output tokens (B, 1 + h*w, D) after the final norm (and PRR)."""
        x, grid = self.prepare_tokens(x)
        for block in self.blocks:
            x = block(x, grid)
        return self.finalize(x)

    def forward(self, x: Tensor) -> Tensor:
        """The CLS embedding (through ``head`` when the model has classes)."""
        return self.head(self.forward_features(x)[:, 0])

    def get_intermediate_layers(self, x: Tensor, n: int = 1) -> list[Tensor]:
        """Outputs of the last ``n`` blocks, each through the final norm (and PRR)."""
        x, grid = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x, grid)
            if i >= len(self.blocks) - n:
                outputs.append(self.finalize(x))
        return outputs

    def get_patch_tokens(
        self, x: Tensor, block: int = -1, finalize: bool = False
    ) -> tuple[Tensor, Grid]:
        """Patch tokens (B, h*w, D) after ``block`` and the grid they lie on.

        By default the raw block output (before the final norm and PRR), as in the frozen
        segmentation protocol.
        """
        last = block % len(self.blocks)
        x, grid = self.prepare_tokens(x)
        for block_module in self.blocks[: last + 1]:
            x = block_module(x, grid)
        if finalize:
            x = self.finalize(x)
        return x[:, self.num_prefix_tokens :], grid

    def get_attention_maps(self, x: Tensor) -> tuple[list[Tensor], Grid]:
        """Softmax attention (B, H, N, N) of every block, via the explicit path."""
        x, grid = self.prepare_tokens(x)
        maps = []
        for block in self.blocks:
            x, attn = block(x, grid, return_attention=True)
            maps.append(attn)
        return maps, grid

    def get_last_selfattention(self, x: Tensor) -> Tensor:
        """DINO's name for the last block's attention maps."""
        return self.get_attention_maps(x)[0][-1]

    def get_gaussian_biases(self, x: Tensor) -> tuple[list[Tensor], Grid]:
        """The GAug bias S (B, H, N, N) of every block for input ``x``."""
        if not self.locality:
            raise ValueError("this model has no GAug (it is a plain ViT)")
        x, grid = self.prepare_tokens(x)
        biases = []
        for block in self.blocks:
            biases.append(block.attn.gaussian_bias(block.norm1(x), grid))
            x = block(x, grid)
        return biases, grid

    @contextmanager
    def recording_gaug(self) -> Iterator[list[GAug]]:
        """Within this context every forward keeps each block's var/alpha (detached)."""
        modules = [b.attn.gaug for b in self.blocks if b.attn.gaug is not None]
        for m in modules:
            m.record, m.recorded = True, None
        try:
            yield modules
        finally:
            for m in modules:
                m.record = False

    def gaug_statistics(self) -> list[dict[str, Tensor]]:
        """Per block, from the last recorded forward: mean var, mean alpha, and the values.

        Tensors stay on the model's device: reading them is the caller's (single) sync.
        """
        stats = []
        for block in self.blocks:
            gaug = block.attn.gaug
            if gaug is None or gaug.recorded is None:
                continue
            var, alpha = gaug.recorded["var"], gaug.recorded["alpha"]
            stats.append(
                {"var_mean": var.mean(), "alpha_mean": alpha.mean(), "var": var, "alpha": alpha}
            )
        return stats


ARCH_PRESETS: dict[str, dict] = {
    "t": {"embed_dim": 192, "num_heads": 3},
    "s": {"embed_dim": 384, "num_heads": 6},
    "b": {"embed_dim": 768, "num_heads": 12},
}
ALIASES = {"tiny": "t", "small": "s", "base": "b"}
ARCH_NAMES = (
    [f"vit_{s}" for s in "tsb"]
    + [f"locatvit_{s}" for s in "tsb"]
    + [f"locatvit_{a}" for a in ALIASES]
)


def canonical_arch(arch: str) -> str:
    """Map any accepted arch name (including aliases) to ``vit_X``/``locatvit_X``."""
    family, _, size = arch.partition("_")
    size = ALIASES.get(size, size)
    name = f"{family}_{size}"
    if family not in ("vit", "locatvit") or size not in ARCH_PRESETS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCH_NAMES)}")
    return name


def build_backbone(arch: str, **kwargs) -> VisionTransformer:
    """Create a backbone by (alias-tolerant) name; kwargs override the preset.

    E.g. ``build_backbone("locatvit_t", img_size=32, patch_size=8, depth=2)`` for tests.
    """
    family, _, size = canonical_arch(arch).partition("_")
    config = {"depth": 12, **ARCH_PRESETS[size], **kwargs, "locality": family == "locatvit"}
    return VisionTransformer(**config)


# -- taking a backbone away (docs/backbones.md#taking-a-backbone-away) ---------------------
# An exported backbone is its state_dict plus, in a .safetensors file, these string facts:
# enough to rebuild the very model (timm kwargs) and to evaluate it as its checkpoint was.
EXPORT_FORMAT = "dino_locat.backbone.v1"
_SIZE_BY_DIM = {preset["embed_dim"]: size for size, preset in ARCH_PRESETS.items()}


def backbone_metadata(model: VisionTransformer) -> dict[str, str]:
    """What rebuilds ``model`` (arch, patch size, depth, native image size, MLP ratio, qkv
    bias, position-embedding rule), as safetensors metadata (str -> str)."""
    if model.embed_dim not in _SIZE_BY_DIM:
        raise ValueError(f"embed dim {model.embed_dim} is no registered arch (192/384/768)")
    first = model.blocks[0]
    return {
        "format": EXPORT_FORMAT,
        "arch": f"{'locatvit' if model.locality else 'vit'}_{_SIZE_BY_DIM[model.embed_dim]}",
        "patch_size": str(model.patch_size),
        "depth": str(len(model.blocks)),
        "img_size": str(model.img_size),
        "mlp_ratio": repr(first.mlp.fc1.out_features / model.embed_dim),
        "qkv_bias": str(first.attn.qkv.bias is not None).lower(),
        "pos_embed_interpolation": model.pos_embed_interpolation,
    }


def metadata_config(metadata: Mapping[str, str], source: str) -> tuple[str, dict[str, Any]]:
    """(arch, :func:`build_backbone` kwargs) from :func:`backbone_metadata`'s strings."""
    try:
        rule = metadata["pos_embed_interpolation"]
        if rule not in POS_EMBED_INTERPOLATIONS:
            raise KeyError(f"pos_embed_interpolation {rule!r}")
        return canonical_arch(metadata["arch"]), {
            "patch_size": int(metadata["patch_size"]),
            "depth": int(metadata["depth"]),
            "img_size": int(metadata["img_size"]),
            "mlp_ratio": float(metadata["mlp_ratio"]),
            "qkv_bias": {"true": True, "false": False}[metadata["qkv_bias"]],
            "pos_embed_interpolation": rule,
        }
    except (KeyError, ValueError) as err:
        raise ValueError(f"{source}: damaged export metadata ({err!r})") from err


def _file_config(name: str, file: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` completed from the metadata of an exported ``file``; a kwarg that
    contradicts the file (another depth, patch or native size) is refused, since the
    weights would not fit, or GAug would be scaled to another native grid."""
    if not Path(file).is_file():
        raise FileNotFoundError(f"pretrained file not found: {file}")
    try:
        with safe_open(file, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{file}: not a readable .safetensors file ({err})") from err
    if metadata.get("format") != EXPORT_FORMAT:
        return kwargs  # someone else's safetensors: the kwargs say what it holds
    arch, config = metadata_config(metadata, file)
    if arch != canonical_arch(name):
        raise ValueError(f"{file} holds a {arch} backbone: create {arch!r}, not {name!r}")
    for key, stored in config.items():
        given = kwargs.get(key)
        if isinstance(given, list | tuple) and len(set(given)) == 1:
            given = given[0]
        if given is not None and key != "pos_embed_interpolation" and given != stored:
            raise ValueError(
                f"{key}={kwargs[key]!r} contradicts {file}, exported with {key}={stored!r}; "
                f"drop {key} (it is read from the file); the model takes any input size that "
                "is a multiple of its patch size"
            )
    rule = kwargs.get("pos_embed_interpolation") or config["pos_embed_interpolation"]
    return {**kwargs, **config, "pos_embed_interpolation": rule}


def _timm_entry(name: str):
    def create(
        pretrained: bool = False,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> VisionTransformer:
        kwargs.pop("cache_dir", None)
        if pretrained:
            cfg = resolve_pretrained_cfg(name, pretrained_cfg, pretrained_cfg_overlay)
            if not cfg.file and cfg.state_dict is None:
                raise RuntimeError(
                    f"{name}: no weights are downloaded; pass a local file, e.g. "
                    f"timm.create_model({name!r}, pretrained=True, num_classes=0, "
                    "pretrained_cfg_overlay=dict(file='backbone.safetensors')) with a file "
                    "written by eval/export.py"
                )
            if cfg.file and str(cfg.file).endswith(".safetensors"):
                kwargs = _file_config(name, str(cfg.file), kwargs)
        return build_model_with_cfg(
            partial(build_backbone, name),
            name,
            pretrained,
            pretrained_cfg=pretrained_cfg,
            pretrained_cfg_overlay=pretrained_cfg_overlay,
            **kwargs,
        )

    create.__name__ = name
    create.__qualname__ = name
    create.__doc__ = (
        f"timm entry point for {name} (see dino_locat.models); ``pretrained=True`` loads a "
        "local file given as ``pretrained_cfg_overlay=dict(file=...)`` (nothing is downloaded)."
    )
    return register_model(create)


# Read by timm's register_model: no weights to download; the backbone has no classifier
# (num_classes 0) and is normalised with ImageNet's mean and std, as DINO trains it.
default_cfgs = generate_default_cfgs(
    {
        name: {
            "num_classes": 0,
            "input_size": (3, 224, 224),
            "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD,
            "interpolation": "bicubic",
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        }
        for name in ARCH_NAMES
    }
)

for _name in ARCH_NAMES:
    globals()[_name] = _timm_entry(_name)
