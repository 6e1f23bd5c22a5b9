"""k-NN classification against a brute-force reference written here (matmul, topk, vote)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dino_locat.evaluation.knn import (
    NeighborStream,
    effective_ks,
    knn_accuracy,
    knn_scores,
    nearest_neighbors,
    neighbor_accuracy,
)
from dino_locat.evaluation.metrics import topk_correct

KS = (10, 20, 100, 200)
TEMPERATURE = 0.07


def random_problem(n_train: int, n_test: int, dim: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    train = F.normalize(torch.randn(n_train, dim, generator=g), dim=1)
    test = F.normalize(torch.randn(n_test, dim, generator=g), dim=1)
    train_labels = torch.randint(0, classes, (n_train,), generator=g)
    test_labels = torch.randint(0, classes, (n_test,), generator=g)
    return train, train_labels, test, test_labels


def brute_force_scores(train, train_labels, test, classes, k, temperature=TEMPERATURE):
    """Every similarity by one matmul, top-k, and the exp(sim / T) vote, one query at a time."""
    sims = test.double() @ train.double().T
    top_sims, top_ids = sims.topk(k, dim=1)
    scores = torch.zeros(len(test), classes, dtype=torch.float64)
    for q in range(len(test)):
        for sim, idx in zip(top_sims[q].tolist(), top_ids[q].tolist(), strict=True):
            scores[q, int(train_labels[idx])] += math.exp(sim / temperature)
    return scores


def brute_force_accuracy(scores, labels):
    """DINO's ranking: a stable descending sort (ties keep class order)."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    top1 = (order[:, 0] == labels).double().mean().item() * 100
    top5 = (order[:, :5] == labels[:, None]).any(dim=1).double().mean().item() * 100
    return top1, top5


def test_nearest_neighbors_merge_slices_and_query_batches():
    train, _, test, _ = random_problem(503, 61, 24, 3, seed=1)
    reference_sims, reference_ids = (test @ train.T).topk(40, dim=1)
    # Tiny slices and query batches: the heap merge across slices is what is tested.
    sims, ids = nearest_neighbors(train, test, 40, query_batch=7, slice_rows=37)
    assert torch.equal(torch.from_numpy(ids), reference_ids)
    torch.testing.assert_close(torch.from_numpy(sims), reference_sims, rtol=0, atol=1e-5)


def test_a_bank_streamed_in_pieces_smaller_than_k_gives_the_same_neighbours_and_votes():
    """How the online k-NN searches: each rank streams its shard's feature batches, some
    shorter than k (or empty); the votes equal those of the whole bank at once."""
    train, train_labels, test, test_labels = random_problem(101, 23, 16, 5, seed=4)
    reference_sims, reference_ids = (test @ train.T).topk(20, dim=1)
    stream = NeighborStream(test, 20, query_batch=6)
    bounds = [0, 3, 3, 20, 21, 60, 101]
    for start, stop in zip(bounds, bounds[1:], strict=False):
        stream.add(train[start:stop], start)
    sims, ids = (torch.from_numpy(a) for a in stream.result())
    assert torch.equal(ids, reference_ids)
    torch.testing.assert_close(sims, reference_sims, rtol=0, atol=1e-5)
    whole = knn_accuracy(train, train_labels, test, test_labels, 5, (10, 20))
    assert neighbor_accuracy(sims, train_labels[ids], test_labels, 5, (10, 20)) == whole


@pytest.mark.parametrize("classes", [10, 7])
def test_knn_scores_and_accuracy_equal_brute_force_for_every_k(classes):
    train, train_labels, test, test_labels = random_problem(400, 90, 32, classes, seed=classes)
    scores = knn_scores(train, train_labels, test, classes, KS, TEMPERATURE)
    accuracy = knn_accuracy(train, train_labels, test, test_labels, classes, KS, TEMPERATURE)
    for k in KS:
        reference = brute_force_scores(train, train_labels, test, classes, k)
        torch.testing.assert_close(scores[k].double(), reference, rtol=1e-4, atol=0)
        assert torch.equal(scores[k].argmax(dim=1), reference.argmax(dim=1))
        top1, top5 = brute_force_accuracy(reference, test_labels)
        assert accuracy[k]["top1"] == pytest.approx(top1)
        assert accuracy[k]["top5"] == pytest.approx(top5)
        assert accuracy[k]["k_used"] == k


def test_one_hot_label_features_give_100_percent():
    classes, per_class = 6, 30
    train_labels = torch.arange(classes).repeat_interleave(per_class)
    test_labels = torch.arange(classes).repeat(5)
    train = F.one_hot(train_labels, classes).float()
    test = F.one_hot(test_labels, classes).float()
    accuracy = knn_accuracy(train, train_labels, test, test_labels, classes, KS)
    for k in KS:
        assert accuracy[k]["top1"] == 100.0
        assert accuracy[k]["top5"] == 100.0
    assert accuracy[200]["k_used"] == 180  # clipped to the bank


def test_fewer_than_five_classes_reports_top1_only():
    train, train_labels, test, test_labels = random_problem(120, 40, 8, 3, seed=5)
    accuracy = knn_accuracy(train, train_labels, test, test_labels, 3, KS)
    for k in KS:
        reference = brute_force_scores(train, train_labels, test, 3, min(k, 120))
        assert accuracy[k]["top1"] == pytest.approx(brute_force_accuracy(reference, test_labels)[0])
        assert accuracy[k]["top5"] is None
    assert accuracy[200]["k_used"] == 120


def test_k_larger_than_bank_is_clipped_and_bad_k_rejected():
    assert effective_ks([10, 500], 50) == {10: 10, 500: 50}
    with pytest.raises(ValueError, match="positive"):
        effective_ks([0, 10], 50)


def test_topk_correct_counts_and_skips_impossible_k():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    labels = torch.tensor([2, 0, 0])
    assert topk_correct(scores, labels, (1, 2, 5)) == [1, 2, None]


def test_zero_score_ties_rank_in_class_order_as_dino():
    # Only class 9 got votes: the other classes tie at 0 and rank 0, 1, 2, 3 after it,
    # so labels 0 and 1 are in the top 5 and 8 is not (topk orders the ties arbitrarily).
    scores = torch.zeros(3, 10)
    scores[:, 9] = 1.0
    assert topk_correct(scores, torch.tensor([0, 1, 8]), (1, 5)) == [0, 2]


def test_top5_with_few_neighbours_equals_dino_ranking():
    # k = 1 and 2 leave most of the 10 classes at score 0: ties decide most of the top 5.
    train, train_labels, test, test_labels = random_problem(300, 200, 16, 10, seed=3)
    accuracy = knn_accuracy(train, train_labels, test, test_labels, 10, (1, 2))
    for k in (1, 2):
        reference = brute_force_scores(train, train_labels, test, 10, k)
        assert accuracy[k]["top5"] == pytest.approx(brute_force_accuracy(reference, test_labels)[1])
