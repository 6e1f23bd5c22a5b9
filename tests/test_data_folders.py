"""ImageFolderDataset on real files, corrupt-file handling, the pretraining dataset choice,
and replayable multi-crop sampling."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from dino_locat.data.fashion_mnist import FashionMNIST
from dino_locat.data.folders import (
    ImageFolderDataset,
    UnreadableImageError,
    build_pretraining_dataset,
    spread_indices,
)
from dino_locat.data.multicrop import EpochSampler, MultiCropDataset
from dino_locat.data.transforms import MultiCropAugmentation, eval_transform


def test_image_folder_reads_png_and_jpeg_with_labels(image_folder):
    dataset = ImageFolderDataset(image_folder, transform=eval_transform(32))
    assert len(dataset) == 18 and dataset.classes == ["circles", "squares", "stripes"]
    image, label = dataset[7]
    assert image.shape == (3, 32, 32) and label == dataset.targets[7]
    assert sorted(set(dataset.targets)) == [0, 1, 2] and dataset.num_skipped == 0


def break_file(image_folder):
    bad = image_folder / "stripes" / "002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG body")
    return bad


def test_unreadable_file_error_names_the_file_also_from_a_worker(image_folder):
    bad = break_file(image_folder)
    dataset = ImageFolderDataset(image_folder, transform=eval_transform(32))
    index = [path for path, _ in dataset.samples].index(str(bad))
    with pytest.raises(UnreadableImageError, match="stripes/002.png"):
        dataset[index]
    loader = DataLoader(dataset, batch_size=len(dataset), num_workers=1)
    with pytest.raises(UnreadableImageError, match="stripes/002.png"):
        next(iter(loader))


def test_skip_corrupt_drops_and_counts_unreadable_files(image_folder):
    bad = break_file(image_folder)
    (image_folder / "circles" / "004.png").write_bytes(b"")
    dataset = ImageFolderDataset(image_folder, transform=eval_transform(32), skip_corrupt=True)
    assert dataset.num_skipped == 2 and str(bad) in dataset.skipped
    assert len(dataset) == len(dataset.targets) == 16
    assert all(dataset[i][0].shape == (3, 32, 32) for i in range(len(dataset)))


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere")


def test_pretraining_dataset_default_is_fashion_mnist_and_subset_spreads(image_folder):
    dataset, text = build_pretraining_dataset(None, subset=100)
    assert isinstance(dataset, FashionMNIST) and len(dataset) == 100 and "Fashion-MNIST" in text
    assert dataset.indices.tolist() == [i * 600 for i in range(100)]
    folder, text = build_pretraining_dataset(image_folder, subset=6)
    assert len(folder) == 6 and sorted(set(folder.targets)) == [0, 1, 2]
    assert spread_indices(10, 0) is None and spread_indices(10, 20) is None


def views_of_epoch(dataset, epoch, num_workers, rank=0, world=1):
    sampler = EpochSampler(dataset, world, rank, seed=5)
    sampler.set_epoch(epoch)
    loader = DataLoader(dataset, sampler=sampler, batch_size=3, num_workers=num_workers)
    return [(torch.cat([c.flatten() for c in crops]), labels) for crops, labels in loader]


def test_an_epoch_replays_exactly_whatever_the_number_of_workers(shared_image_folder):
    augment = MultiCropAugmentation(local_crops_number=2, global_crops_size=32, local_crops_size=16)
    dataset = MultiCropDataset(ImageFolderDataset(shared_image_folder), augment, seed=5)
    first = views_of_epoch(dataset, 1, num_workers=0)
    replay = views_of_epoch(dataset, 1, num_workers=2)
    for (a, la), (b, lb) in zip(first, replay, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    other = views_of_epoch(dataset, 2, num_workers=0)
    assert not torch.equal(first[0][0], other[0][0])
    # Two ranks see disjoint halves of the data in the same epoch.
    rank0 = EpochSampler(dataset, 2, 0, seed=5)
    rank1 = EpochSampler(dataset, 2, 1, seed=5)
    indices0, indices1 = {i for _, i in rank0}, {i for _, i in rank1}
    assert not indices0 & indices1 and len(indices0 | indices1) == len(dataset)


def test_n_ranks_at_batch_b_see_the_images_of_one_process_at_batch_n_b():
    """Step by step the same images, and as many steps, also when the data does not divide
    by the number of ranks (the tail is dropped, never padded with repeats)."""
    dataset = list(range(31))
    for world, batch in ((2, 4), (3, 2), (4, 3)):
        ranks = [EpochSampler(dataset, world, rank, seed=5) for rank in range(world)]
        single = EpochSampler(dataset, 1, 0, seed=5)
        for sampler in (*ranks, single):
            sampler.set_epoch(3)
        per_rank = [[index for _, index in sampler] for sampler in ranks]
        steps = len(per_rank[0]) // batch
        alone = [index for _, index in single]
        assert steps == len(alone) // (world * batch)
        for step in range(steps):
            together = {i for part in per_rank for i in part[step * batch : (step + 1) * batch]}
            assert together == set(alone[step * world * batch : (step + 1) * world * batch])
            assert len(together) == world * batch
