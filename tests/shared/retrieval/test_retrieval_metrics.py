"""Retrieval metrics against pytorch-metric-learning and a brute-force numpy version."""

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from shared.retrieval.metrics import drop_self, retrieval_metrics


def embeddings_with_uneven_classes(seed):
    """~300 items, class sizes 1..12 (some singletons), noisy enough that metrics are < 1."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 13, 45)
    sizes[:4] = 1
    labels = np.repeat(np.arange(len(sizes)), sizes)
    centres = rng.standard_normal((len(sizes), 16))
    x = centres[labels] + 0.9 * rng.standard_normal((len(labels), 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(len(labels))
    return x[perm].astype(np.float32), labels[perm]


def brute_force_recall(x, labels, k):
    sims = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    has_other = np.array([(labels == y).sum() > 1 for y in labels])
    hits = [np.any(labels[order[i]] == labels[i]) for i in range(len(x)) if has_other[i]]
    return float(np.mean(hits))


def test_matches_pytorch_metric_learning():
    x, labels = embeddings_with_uneven_classes(0)
    got = retrieval_metrics(x, labels, ks=(1, 4))
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count"
    )
    ref = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(labels))
    assert got["precision@1"] == pytest.approx(ref["precision_at_1"], abs=1e-9)
    assert got["map@r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-9)
    assert 0.1 < got["map@r"] < 0.95


def test_recall_matches_brute_force_and_caps_k():
    x, labels = embeddings_with_uneven_classes(1)
    got = retrieval_metrics(torch.from_numpy(x), torch.from_numpy(labels), ks=(1, 2, 8, 5000))
    assert list(got)[:4] == ["recall@1", "recall@2", "recall@8", "recall@5000"]
    for k in (1, 2, 8):
        assert got[f"recall@{k}"] == pytest.approx(brute_force_recall(x, labels, k), abs=1e-12)
    assert got["recall@5000"] == 1.0  # every non-singleton query has a match somewhere
    assert got["recall@1"] == got["precision@1"]


def test_including_self_makes_every_first_hit():
    x, labels = embeddings_with_uneven_classes(2)
    got = retrieval_metrics(x, labels, ks=(1,), exclude_self=False)
    assert got["recall@1"] == 1.0 and got["precision@1"] == 1.0


def test_drop_self_wherever_it_is():
    sims = np.array([[0.9, 1.0, 0.5], [1.0, 0.8, 0.7], [0.6, 0.5, 0.4]], dtype=np.float32)
    idx = np.array([[3, 0, 1], [1, 0, 2], [4, 5, 6]])
    s, i = drop_self(sims, idx)
    np.testing.assert_array_equal(i, [[3, 1], [0, 2], [4, 5]])
    np.testing.assert_array_equal(s, np.float32([[0.9, 0.5], [0.8, 0.7], [0.6, 0.5]]))


def test_all_singletons_raise():
    x, _ = embeddings_with_uneven_classes(3)
    with pytest.raises(ValueError, match="no query"):
        retrieval_metrics(x, np.arange(len(x)))
