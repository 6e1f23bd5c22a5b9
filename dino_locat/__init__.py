"""dino_locat: DINO self-supervised pretraining for LocAtViT backbones."""

__version__ = "0.1.0"
