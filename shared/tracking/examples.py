"""Retrieval examples: a fixed set of queries and their nearest neighbours, right or wrong.

Shared by the W&B table of the `WandbExtrasCallback` and the inspection notebooks' galleries.
Inputs are what `EmbeddingCallback.gathered()` yields per dataloader: `index` (store rows),
L2-normalised `embeddings` and `labels`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shared.retrieval.search import knn_search


@dataclass
class Example:
    query: int  # store row of the query image
    label: int
    neighbours: list[int]  # store rows, most similar first
    sims: list[float]
    right: list[bool]  # neighbour has the query's label

    @property
    def top1_right(self) -> bool:
        return bool(self.right[:1] and self.right[0])


def pick_queries(n_total: int, n: int, seed: int = 0) -> np.ndarray:
    """The same `n` positions for the same split at every evaluation (seeded, sorted)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n_total)[: min(n, n_total)])


def nearest_examples(
    query: dict[str, torch.Tensor],
    bank: dict[str, torch.Tensor] | None = None,
    n_queries: int = 16,
    k: int = 5,
    seed: int = 0,
    positions: np.ndarray | None = None,
) -> list[Example]:
    """Top-`k` neighbours of `n_queries` seeded queries in `bank`.

    `bank=None` searches the query split against itself and leaves each query out (the
    product-matching protocol); otherwise the bank is another split (kNN protocol).
    """
    q_emb, q_lab, q_idx = (np.asarray(query[key]) for key in ("embeddings", "labels", "index"))
    if positions is None:
        positions = pick_queries(len(q_idx), n_queries, seed)
    self_search = bank is None
    if self_search:
        b_emb, b_lab, b_idx = q_emb, q_lab, q_idx
    else:
        b_emb, b_lab, b_idx = (np.asarray(bank[key]) for key in ("embeddings", "labels", "index"))
    sims, idx = knn_search(q_emb[positions], b_emb, k + int(self_search))
    examples = []
    for row, pos in enumerate(positions):
        keep = idx[row] >= 0
        if self_search:
            keep &= idx[row] != pos
        cols = np.flatnonzero(keep)[:k]
        found = idx[row, cols]
        examples.append(
            Example(
                query=int(q_idx[pos]),
                label=int(q_lab[pos]),
                neighbours=[int(b_idx[j]) for j in found],
                sims=[float(s) for s in sims[row, cols]],
                right=[bool(b_lab[j] == q_lab[pos]) for j in found],
            )
        )
    return examples
