"""What every LightningModule here shares: `embed()` for evaluators, self-describing checkpoints."""

from __future__ import annotations

import torch
from lightning import LightningModule


class EmbeddingModule(LightningModule):
    """Subclasses implement `embed(uint8 images) -> L2-normalised [B, D]`.

    Validation and test steps return embeddings with labels and store rows; evaluator
    callbacks (kNN, retrieval metrics, threshold sweep) gather and score them.
    """

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        return {
            "embeddings": self.embed(batch["images"]),
            "labels": batch["labels"],
            "index": batch["index"],
        }

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        return self.validation_step(batch, batch_idx, dataloader_idx)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["module_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
