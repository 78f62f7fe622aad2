"""Recall@K, precision@1 and mAP@R of one split searched against itself."""

from __future__ import annotations

import logging

import numpy as np

from shared.callbacks.embeddings import EmbeddingCallback
from shared.retrieval.metrics import retrieval_metrics

log = logging.getLogger(__name__)


class RetrievalCallback(EmbeddingCallback):
    """Each query against all other items of the split (SOP protocol); queries whose label
    has no other item cannot score and are skipped, as pytorch-metric-learning does."""

    def __init__(
        self, ks: tuple[int, ...] = (1, 10), loader: str = "query", every_n_epochs: int = 1
    ) -> None:
        super().__init__(every_n_epochs)
        self.ks, self.loader = tuple(ks), loader

    def evaluate(self, data, trainer) -> dict[str, float]:
        split = data[self.loader]
        labels = split["labels"].numpy()
        if len(np.unique(labels)) == len(labels):
            log.warning(
                "Retrieval metrics skipped: no label occurs twice in the split "
                "(use split_by=class or a larger val_fraction)"
            )
            return {}
        return retrieval_metrics(split["embeddings"], labels, ks=self.ks)
