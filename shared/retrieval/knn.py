"""Weighted k-nearest-neighbour classification, the standard SSL evaluation.

Protocol of Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance
Discrimination") as used by DINO (Caron et al. 2021): cosine similarity on L2-normalised
features, each of the k nearest bank items votes for its class with weight exp(sim / T),
T = 0.07, top-1 accuracy reported for k = 10, 20, 100, 200.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from shared.retrieval.search import as_float32_matrix, ensure_unit_rows, eval_search


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def weighted_knn_vote(
    sims: Any, neighbour_labels: Any, num_classes: int, temperature: float = 0.07
) -> Any:
    """Class scores [Nq, C]: sum over neighbours of exp(sim / T) into each neighbour's class.

    `sims` and `neighbour_labels` are [Nq, k]. Neighbours with a negative label (e.g. the -1
    FAISS returns for a missing result) do not vote. Returns the kind of `sims` (torch or
    numpy), float32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    as_numpy = not isinstance(sims, torch.Tensor)
    s = _as_tensor(sims).float()
    lab = _as_tensor(neighbour_labels).to(s.device, torch.long)
    if s.shape != lab.shape or s.ndim != 2:
        raise ValueError(f"sims {tuple(s.shape)}, labels {tuple(lab.shape)}: need equal [Nq, k]")
    if lab.numel() and int(lab.max()) >= num_classes:
        raise ValueError(f"a neighbour label is >= num_classes={num_classes}")
    valid = lab >= 0
    weights = torch.where(valid, (s / temperature).exp(), torch.zeros_like(s))
    scores = torch.zeros(s.shape[0], num_classes, dtype=torch.float32, device=s.device)
    scores.scatter_add_(1, lab.clamp(min=0), weights)
    return scores.cpu().numpy() if as_numpy else scores


def knn_accuracy(
    bank_features: Any,
    bank_labels: Any,
    query_features: Any,
    query_labels: Any,
    ks: Iterable[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 8192,
    device: str = "auto",
    **search_kwargs: Any,
) -> dict[int, float]:
    """Weighted kNN top-1 accuracy of the queries against the bank, for each k in `ks`.

    Features are L2-normalised here unless every row already has unit norm (then they are
    searched exactly as given). One search with the largest k serves every k: the top-k is a
    prefix of the top-max(k). Each k is capped at the bank size, and ks that become equal
    after capping share one key. Queries are voted `chunk_size` at a time so the [chunk, C]
    score matrix stays small. `search_kwargs` go to `knn_predictions` (e.g. index="ivf",
    target_recall, search_info).
    """
    query_y = _as_tensor(query_labels).long().cpu().reshape(-1)
    preds = knn_predictions(
        bank_features, bank_labels, query_features, ks, temperature, num_classes, chunk_size,
        device, query_count=query_y.numel(), **search_kwargs,
    )  # fmt: skip
    return {k: int((p == query_y).sum()) / len(query_y) for k, p in preds.items()}


def knn_predictions(
    bank_features: Any,
    bank_labels: Any,
    query_features: Any,
    ks: Iterable[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 8192,
    device: str = "auto",
    *,
    query_count: int | None = None,
    search_info: dict | None = None,
    **search_kwargs: Any,
) -> dict[int, torch.Tensor]:
    """Weighted kNN predicted class per query for each (capped) k: {k: int64 tensor [Nq]}.

    What `knn_accuracy` scores; same arguments. `num_classes` defaults to the largest bank
    label + 1 (classes no bank item has can never win the vote).
    A query's scores grow k by k in one scatter buffer: adding neighbours k1..k2-1 to the
    scores of the first k1 is the same sequence of float additions as voting the first k2
    afresh, so every k's scores are bit for bit those of `weighted_knn_vote`. Ties between
    classes go to the lowest class id (torch argmax). `query_count` only checks the row count.
    The search is `eval_search`; with a tuned index its info (reached recall) is copied into
    `search_info` when a dict is given.
    """
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be non-empty and >= 1, got {ks}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    bank = ensure_unit_rows(as_float32_matrix(bank_features, "bank_features"))
    query = ensure_unit_rows(as_float32_matrix(query_features, "query_features"))
    bank_y = _as_tensor(bank_labels).long().cpu().reshape(-1)
    if bank_y.numel() != bank.shape[0] or query_count not in (None, query.shape[0]):
        raise ValueError("labels must have one entry per feature row")
    if num_classes is None:
        num_classes = int(bank_y.max()) + 1 if bank_y.numel() else 0
    if bank_y.numel() and int(bank_y.max()) >= num_classes:
        raise ValueError(f"a bank label is >= num_classes={num_classes}")

    capped = sorted({min(k, bank.shape[0]) for k in ks})
    sims, idx, info = eval_search(
        query, bank, capped[-1], device=device, chunk_size=chunk_size, **search_kwargs
    )
    if search_info is not None and info is not None:
        search_info.update(info)
    sims_t, idx_t = torch.from_numpy(sims), torch.from_numpy(idx)
    # Negative labels (and the -1 of a missing neighbour) do not vote: weight 0, class 0.
    unlabelled = bool(bank_y.numel()) and int(bank_y.min()) < 0
    votes_y = bank_y.clamp(min=0) if unlabelled else bank_y

    preds = {k: torch.empty(query.shape[0], dtype=torch.long) for k in capped}
    for start in range(0, query.shape[0], chunk_size):
        stop = min(start + chunk_size, query.shape[0])
        chunk_idx = idx_t[start:stop]
        neighbour_y = votes_y[chunk_idx.clamp(min=0)]
        weights = (sims_t[start:stop] / temperature).exp()
        missing = chunk_idx < 0
        if unlabelled:
            missing |= bank_y[chunk_idx.clamp(min=0)] < 0
        weights.masked_fill_(missing, 0.0)
        scores = torch.zeros(stop - start, num_classes, dtype=torch.float32)
        done = 0
        for k in capped:
            scores.scatter_add_(1, neighbour_y[:, done:k], weights[:, done:k])
            done = k
            preds[k][start:stop] = scores.argmax(dim=1)
    return preds
