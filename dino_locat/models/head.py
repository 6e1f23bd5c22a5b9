"""The DINO projection head and the wrapper that runs backbone + head over multi-crops.

The last layer is weight-normalised, ``W = g * V / ||V||`` per output unit, implemented
here with two plain parameters named ``weight_g`` and ``weight_v``: the state_dict keys
(``head.last_layer.weight_g`` / ``.weight_v``) are ordinary tensors, match official DINO
checkpoints, and load with ``weights_only=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation (magnitude g, direction V).

    V starts as ``nn.Linear``'s default initialisation (Kaiming-uniform, a = sqrt(5)), g
    as 1: DINO builds its last layer after the trunc-normal init of the MLP, so the
    prototypes keep that default; with L2-normalised inputs it sets how spread the
    initial logits are.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """MLP (``nlayers`` linear layers, GELU) -> bottleneck -> L2 norm -> weight-normed layer.

    With ``norm_last_layer`` the magnitudes g stay frozen at 1, so the output is a cosine
    similarity to each of the ``out_dim`` prototypes (DINO's stabilising default).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(d_in, d_out))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Backbone + head for a list of crops of possibly different sizes.

    Consecutive crops of the same resolution go through the backbone as one batch (two
    global, then all local ones); the head then runs once on all CLS embeddings. Output
    rows are ordered view by view: (len(crops) * B, out_dim).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self, crops: Tensor | list[Tensor], return_features: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Head outputs; with ``return_features`` also the backbone embeddings the head read
        (same row order), for regularisers on the backbone output such as KoLeo."""
        if isinstance(crops, Tensor):
            crops = [crops]
        groups: list[list[Tensor]] = []
        for crop in crops:
            if groups and groups[-1][0].shape[-2:] == crop.shape[-2:]:
                groups[-1].append(crop)
            else:
                groups.append([crop])
        features = torch.cat([self.backbone(torch.cat(group)) for group in groups])
        if return_features:
            return self.head(features), features
        return self.head(features)
