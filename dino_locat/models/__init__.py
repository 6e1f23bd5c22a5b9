"""Backbones (ViT / LocAtViT, registered with timm) and the DINO head."""

from dino_locat.models.vision_transformer import (
    ARCH_NAMES,
    POS_EMBED_INTERPOLATIONS,
    VisionTransformer,
    build_backbone,
    canonical_arch,
)

__all__ = [
    "ARCH_NAMES",
    "POS_EMBED_INTERPOLATIONS",
    "VisionTransformer",
    "build_backbone",
    "canonical_arch",
]
