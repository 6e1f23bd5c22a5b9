"""Datasets and transforms: ImageFolder, segmentation folders, the embedded default."""
