"""Hummingbird retrieval against references written here (matmul, topk, softmax vote)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from dino_locat.data.segmentation import IGNORE_INDEX, RandomResizedCropPair, SeededPass
from dino_locat.evaluation.hummingbird import (
    MemoryBank,
    patch_label_maps,
    patch_soft_labels,
    rarer_classes_first,
    retrieve_soft_labels,
    score_label_maps,
)
from dino_locat.evaluation.metrics import ConfusionMatrix


def brute_force(bank, labels, queries, k, temperature):
    """Every cosine by one matmul, top-k, softmax(cos / T) weights, weighted label sum."""
    sims = queries.double() @ bank.double().T
    top, ids = sims.topk(k, dim=1)
    weights = torch.softmax(top / temperature, dim=1)
    out = torch.zeros(len(queries), labels.shape[1], dtype=torch.float64)
    for q in range(len(queries)):
        for weight, index in zip(weights[q], ids[q], strict=True):
            out[q] += weight * labels[index].double()
    return out


@pytest.mark.parametrize("k,temperature", [(30, 0.02), (7, 0.1)])
def test_retrieval_equals_brute_force(k, temperature):
    g = torch.Generator().manual_seed(k)
    bank = F.normalize(torch.randn(500, 24, generator=g), dim=1)
    queries = F.normalize(torch.randn(60, 24, generator=g), dim=1)
    labels = torch.rand(500, 6, generator=g)
    labels = (labels / labels.sum(1, keepdim=True)).half()
    scores = retrieve_soft_labels(bank, labels, queries, k, temperature)
    reference = brute_force(bank, labels.float(), queries, k, temperature)
    torch.testing.assert_close(scores.double(), reference, rtol=1e-4, atol=1e-5)
    assert torch.equal(scores.argmax(1), reference.argmax(1))


def patch_aligned_masks(batch: int, grid: int, patch: int, classes: int, seed: int):
    """Masks whose every patch holds one class, and that class per patch (B, grid*grid)."""
    g = torch.Generator().manual_seed(seed)
    per_patch = torch.randint(0, classes, (batch, grid, grid), generator=g)
    masks = per_patch.repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    return masks, per_patch.flatten(1)


def test_one_hot_memory_recovers_the_labels_exactly():
    classes, patch, grid = 5, 4, 6
    masks, per_patch = patch_aligned_masks(20, grid, patch, classes, seed=0)
    soft = patch_soft_labels(masks, patch, classes)
    assert torch.equal(soft, F.one_hot(per_patch, classes).float())
    bank = MemoryBank(20 * grid * grid, classes, classes)
    for features, labels in zip(soft, soft, strict=True):  # feature = one-hot of the class
        bank.add(features, labels.half())
    _, val_patch = patch_aligned_masks(4, grid, patch, classes, seed=1)
    queries = F.one_hot(val_patch, classes).float()
    maps = patch_label_maps(bank, queries, classes, 30, 0.02)
    assert torch.equal(maps.argmax(1).flatten(1), val_patch)
    torch.testing.assert_close(maps.permute(0, 2, 3, 1).flatten(1, 2), queries)
    # Scored on masks at the patch grid's size (bilinear upsampling would blur patch edges).
    confusion = ConfusionMatrix(classes, IGNORE_INDEX)
    score_label_maps(confusion, maps, list(val_patch.view(4, grid, grid)))
    assert confusion.mean_iou() == 100.0 and confusion.pixel_accuracy() == 100.0


def test_ignore_pixels_never_count():
    ignore = IGNORE_INDEX
    masks = torch.tensor([[[0, 0, ignore, ignore], [ignore, 2, ignore, ignore]]])
    soft = patch_soft_labels(masks, 2, 3)  # two 2x2 patches
    torch.testing.assert_close(soft[0, 0], torch.tensor([2 / 3, 0.0, 1 / 3]))
    torch.testing.assert_close(soft[0, 1], torch.zeros(3))  # only ignore pixels: no label
    assert rarer_classes_first(soft[0], 5, torch.Generator()).tolist() == [0]
    # In scoring, ignore pixels count for nothing, whatever is predicted there.
    confusion = ConfusionMatrix(3, IGNORE_INDEX)
    maps = torch.zeros(1, 3, 1, 2)
    maps[0, 2] = 1.0  # predicts class 2 everywhere
    truth = torch.tensor([[2, 2, IGNORE_INDEX, IGNORE_INDEX]])
    score_label_maps(confusion, maps, [truth])
    assert confusion.counts.sum() == 2 and confusion.mean_iou() == 100.0
    with pytest.raises(ValueError, match="0..2"):
        patch_soft_labels(torch.full((1, 2, 2), 3), 2, 3)


def test_capped_memory_prefers_the_rare_class_patches():
    # One image, 16 patches: 14 background only, one also holding class 1, one of class 2.
    soft = torch.zeros(16, 3)
    soft[:, 0] = 1.0
    soft[5] = torch.tensor([0.5, 0.5, 0.0])
    soft[9] = torch.tensor([0.0, 0.0, 1.0])
    kept = torch.zeros(16)
    for seed in range(200):
        chosen = rarer_classes_first(soft, 2, torch.Generator().manual_seed(seed))
        assert len(chosen) == 2 and len(set(chosen.tolist())) == 2
        kept[chosen] += 1
    # Score = summed image frequency of the patch's classes x uniform: 1 x u for the class-2
    # patch, 14 x u for background, 15 x u for the mixed one. Seeded, so deterministic.
    background = kept[[i for i in range(16) if i not in (5, 9)]]
    assert kept[9] > 150 and kept[9] > 4 * background.max()
    assert len(rarer_classes_first(soft, 6, torch.Generator())) == 6
    assert len(rarer_classes_first(soft, 100, torch.Generator())) == 16


def test_memory_bank_is_one_allocation_filled_in_place():
    bank = MemoryBank(10, 4, 3)
    storage = bank.features.untyped_storage().data_ptr()
    bank.add(torch.ones(6, 4), torch.zeros(6, 3))
    bank.add(torch.ones(4, 4), torch.zeros(4, 3))
    assert bank.size == 10 and bank.features.untyped_storage().data_ptr() == storage
    with pytest.raises(RuntimeError, match="overflow"):
        bank.add(torch.ones(1, 4), torch.zeros(1, 3))


class Pairs(Dataset):
    """Random-looking images with a mask that records each pixel's column."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, size=(6, 24, 24, 3), dtype=np.uint8)
        self.mask = np.tile(np.arange(24, dtype=np.uint8), (24, 1))
        self.transform = RandomResizedCropPair(16)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index]), Image.fromarray(self.mask))


def test_seeded_pass_augments_an_item_alike_whoever_loads_it():
    """The memory's crop and flip depend on (seed, pass, index), not on shard, batch or order."""
    pairs = Pairs()
    whole = [m for _, m in DataLoader(SeededPass(pairs, seed=0, epoch=1), batch_size=4)]
    masks = torch.cat(whole)
    shard = SeededPass(pairs, seed=0, epoch=1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for index in (5, 3, 4):  # another rank's share, out of order
        assert torch.equal(Subset(shard, [3, 4, 5])[index - 3][1], masks[index])
    assert torch.equal(torch.get_rng_state(), before), "the global generator is left as it was"
    other_pass = torch.stack([m for _, m in SeededPass(pairs, seed=0, epoch=2)])
    other_seed = torch.stack([m for _, m in SeededPass(pairs, seed=1, epoch=1)])
    assert not torch.equal(other_pass, masks) and not torch.equal(other_seed, masks)
