"""Recall@K, precision@1 and mAP@R of one split searched against itself."""

from __future__ import annotations

from shared.callbacks.embeddings import EmbeddingCallback
from shared.retrieval.metrics import retrieval_metrics


class RetrievalCallback(EmbeddingCallback):
    def __init__(self, ks: tuple[int, ...] = (1, 10), loader: int = 1,
                 every_n_epochs: int = 1) -> None:
        super().__init__(every_n_epochs)
        self.ks, self.loader = tuple(ks), loader

    def evaluate(self, data, trainer) -> dict[str, float]:
        split = data[self.loader]
        return retrieval_metrics(split["embeddings"], split["labels"], ks=self.ks)
