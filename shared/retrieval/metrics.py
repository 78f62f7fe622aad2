"""Retrieval metrics of one labelled set searched against itself.

Recall@K follows the Stanford Online Products protocol (Song et al. 2016, "Deep Metric
Learning via Lifted Structured Feature Embedding"): every item queries all the others, a hit
if any of its K nearest shares its label. MAP@R follows Musgrave et al. 2020 ("A Metric
Learning Reality Check") as pytorch-metric-learning's AccuracyCalculator computes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from shared.retrieval.search import as_float32_matrix, knn_search, l2_normalize


def _labels_array(labels: Any) -> np.ndarray:
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels).reshape(-1)


def drop_self(sims: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index from a self-search result, keeping the others in order.

    The self match is usually rank 0 but not always (ties with duplicates), so it is looked
    up, not assumed; a row whose self was not returned loses its last column instead.
    """
    is_self = idx == np.arange(idx.shape[0])[:, None]
    # A stable sort on the "is self" flag moves the (at most one) self entry to the end.
    order = np.argsort(is_self, axis=1, kind="stable")[:, : idx.shape[1] - 1]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)


def retrieval_metrics(
    embeddings: Any,
    labels: Any,
    ks: Iterable[int] = (1, 10, 100),
    exclude_self: bool = True,
    device: str = "auto",
) -> dict[str, float]:
    """Recall@K for each K, precision@1 and MAP@R of `embeddings` retrieved against themselves.

    Embeddings are L2-normalised here (cosine similarity). With `exclude_self` (the SOP
    protocol) a query never retrieves itself and R = number of OTHER items with its label;
    without it the query is an ordinary gallery item and R counts it too. Queries with R = 0
    (singleton labels) cannot score and are skipped for every metric, as pytorch-metric-
    learning does. K is capped at the gallery size; the key keeps the requested K. One exact
    search with k = max(max(ks), largest R) serves all metrics, so MAP@R is exact.
    """
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be non-empty and >= 1, got {ks}")
    x = l2_normalize(as_float32_matrix(embeddings, "embeddings"))
    y = _labels_array(labels)
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"{y.shape[0]} labels for {n} embeddings")
    _, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
    r = counts[codes] - 1 if exclude_self else counts[codes]
    keep = r > 0
    if not keep.any():
        raise ValueError("retrieval_metrics: no query has another item with its label")

    n_gallery = n - 1 if exclude_self else n
    k = min(max(max(ks), int(r.max())), n_gallery)
    if exclude_self:
        sims, idx = knn_search(x, x, k + 1, device=device)
        sims, idx = drop_self(sims, idx)
    else:
        sims, idx = knn_search(x, x, k, device=device)
    codes_q, r_q, idx_q = codes[keep], r[keep], idx[keep]
    hit = (idx_q >= 0) & (codes[np.clip(idx_q, 0, None)] == codes_q[:, None])

    out: dict[str, float] = {}
    for kk in ks:
        out[f"recall@{kk}"] = float(hit[:, : min(kk, n_gallery)].any(axis=1).mean())
    out["precision@1"] = float(hit[:, 0].mean())
    # MAP@R: mean over the first R ranks of precision@i at the relevant ranks, divided by R.
    rank = np.arange(1, hit.shape[1] + 1)
    within_r = rank[None, :] <= r_q[:, None]
    rel = hit & within_r
    precision_at_i = np.cumsum(rel, axis=1) / rank[None, :]
    out["map@r"] = float(((precision_at_i * rel).sum(axis=1) / r_q).mean())
    return out
