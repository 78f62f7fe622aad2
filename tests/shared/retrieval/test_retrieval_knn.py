"""Weighted kNN vote and accuracy against brute-force loops over torch similarities."""

import math

import numpy as np
import pytest
import torch

from shared.retrieval.knn import knn_accuracy, knn_predictions, weighted_knn_vote
from shared.retrieval.search import knn_search, l2_normalize


def clustered(n, dim, n_classes, noise, seed):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.randint(0, n_classes, (n,), generator=gen)
    x = centres[labels] + noise * torch.randn(n, dim, generator=gen)
    return x, labels


def brute_force_accuracy(bank, bank_y, query, query_y, k, temperature, num_classes):
    bank = torch.nn.functional.normalize(bank.double(), dim=1)
    query = torch.nn.functional.normalize(query.double(), dim=1)
    correct = 0
    for q, y in zip(query, query_y, strict=True):
        sims = bank @ q
        top = torch.argsort(sims, descending=True)[:k]
        scores = [0.0] * num_classes
        for j in top.tolist():
            scores[int(bank_y[j])] += math.exp(float(sims[j]) / temperature)
        correct += int(max(range(num_classes), key=scores.__getitem__) == int(y))
    return correct / len(query)


def test_vote_matches_loop():
    rng = np.random.default_rng(0)
    sims = rng.uniform(-1, 1, (30, 12)).astype(np.float32)
    labels = rng.integers(0, 5, (30, 12))
    labels[3, 4] = -1  # a missing neighbour does not vote
    scores = weighted_knn_vote(sims, labels, 5, temperature=0.1)
    assert isinstance(scores, np.ndarray) and scores.shape == (30, 5)
    ref = np.zeros((30, 5))
    for i in range(30):
        for j in range(12):
            if labels[i, j] >= 0:
                ref[i, labels[i, j]] += math.exp(sims[i, j] / 0.1)
    np.testing.assert_allclose(scores, ref, rtol=1e-5)
    as_torch = weighted_knn_vote(torch.from_numpy(sims), torch.from_numpy(labels), 5, 0.1)
    assert isinstance(as_torch, torch.Tensor)
    np.testing.assert_allclose(as_torch.numpy(), scores)


def test_accuracy_matches_brute_force():
    bank, bank_y = clustered(500, 16, 10, 1.6, seed=1)
    query, query_y = clustered(120, 16, 10, 1.6, seed=2)
    ks = (1, 5, 20, 100)
    got = knn_accuracy(bank, bank_y, query, query_y, ks=ks, temperature=0.07, chunk_size=50)
    assert list(got) == list(ks)
    for k in ks:
        assert got[k] == pytest.approx(
            brute_force_accuracy(bank, bank_y, query, query_y, k, 0.07, 10), abs=1e-12
        )
    # Noisy clusters: the check is only meaningful if accuracy is neither 0 nor 1.
    assert 0.3 < got[20] < 1.0


def test_ks_capped_at_bank_size_and_collapse():
    bank, bank_y = clustered(30, 8, 4, 1.0, seed=3)
    query, query_y = clustered(40, 8, 4, 1.0, seed=4)
    got = knn_accuracy(bank.numpy(), bank_y.numpy(), query.numpy(), query_y.numpy())
    assert sorted(got) == [10, 20, 30]
    expected = brute_force_accuracy(bank, bank_y, query, query_y, 30, 0.07, 4)
    assert got[30] == pytest.approx(expected, abs=1e-12)


def test_bad_ks_raise():
    bank, bank_y = clustered(10, 4, 2, 1.0, seed=5)
    with pytest.raises(ValueError, match="ks"):
        knn_accuracy(bank, bank_y, bank, bank_y, ks=(0, 5))


def test_predictions_equal_one_vote_per_k():
    """Scores grown k by k in one buffer are the fresh vote of each k: same argmax."""
    bank, bank_y = clustered(800, 24, 12, 2.0, seed=6)
    query, _ = clustered(150, 24, 12, 2.0, seed=7)
    ks = (1, 3, 10, 50, 200)
    preds = knn_predictions(bank, bank_y, query, ks=ks, num_classes=12, chunk_size=40)
    sims, idx = knn_search(l2_normalize(query), l2_normalize(bank), max(ks))
    for k in ks:
        scores = weighted_knn_vote(sims[:, :k], bank_y.numpy()[idx[:, :k]], 12)
        np.testing.assert_array_equal(preds[k].numpy(), scores.argmax(axis=1))


def test_ivf_with_every_cell_probed_gives_the_flat_accuracy():
    bank, bank_y = clustered(3000, 16, 10, 1.2, seed=8)
    query, query_y = clustered(200, 16, 10, 1.2, seed=9)
    flat = knn_accuracy(bank, bank_y, query, query_y, ks=(5, 20))
    ivf = knn_accuracy(bank, bank_y, query, query_y, ks=(5, 20), index="ivf", nlist=30, nprobe=30)
    assert ivf == flat


def test_negative_bank_labels_do_not_vote_and_bad_labels_raise():
    bank, bank_y = clustered(300, 8, 4, 1.0, seed=10)
    query, query_y = clustered(60, 8, 4, 1.0, seed=11)
    hidden = bank_y.clone()
    hidden[::3] = -1  # unlabelled bank items: as if absent from the neighbour lists
    got = knn_accuracy(bank, hidden, query, query_y, ks=(7,))
    sims, idx = knn_search(l2_normalize(query.numpy()), l2_normalize(bank.numpy()), 7)
    scores = weighted_knn_vote(sims, hidden.numpy()[idx], 4)
    assert got[7] == float(np.mean(scores.argmax(axis=1) == query_y.numpy()))
    with pytest.raises(ValueError, match="num_classes"):
        knn_accuracy(bank, bank_y, query, query_y, ks=(5,), num_classes=2)
