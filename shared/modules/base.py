"""What every LightningModule here shares: `embed()` for evaluators, self-describing checkpoints."""

from __future__ import annotations

from typing import ClassVar

import torch
from lightning import LightningModule


class EmbeddingModule(LightningModule):
    """Subclasses implement `embed(uint8 images) -> L2-normalised [B, D]`.

    Validation and test steps return embeddings with labels and store rows; evaluator
    callbacks (kNN, retrieval metrics, threshold sweep) gather and score them.

    Each module class declares what shared tools need to know of it, so they never name a
    module: `lr_key`, the hyper-parameter `lr_find` tunes (`lr_override` turns the
    optimiser lr it finds into that value), and `resume_sensitive`, the hyper-parameters
    that change parameter shapes or meaning, which a resumed checkpoint must match;
    `embed_backbone`, the attribute path of the `TimmBackbone` that `embed()` runs, which
    another run's `backbone.init_from_run` copies.
    """

    lr_key: ClassVar[str | None] = None
    resume_sensitive: ClassVar[frozenset[str]] = frozenset()
    embed_backbone: ClassVar[str | None] = None

    @classmethod
    def lr_override(cls, lr: float, global_batch: int) -> dict:
        """The config value the optimiser lr `lr` stands for (here: the lr itself)."""
        return {"key": f"module.{cls.lr_key}", "value": lr} if cls.lr_key else {}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loggers_write_this_step(self) -> bool:
        """Whether the loggers write this training step's on-step metrics.

        Lightning writes them every `trainer.log_every_n_steps` steps, but every `self.log`
        call costs its bookkeeping (about a millisecond for a few values: a real share of a
        fast GPU step). Values that only matter in the logs can be logged only when this is
        true; what the loggers receive is unchanged. The test is the one Lightning's own
        LearningRateMonitor uses.
        """
        trainer = self.trainer
        if not trainer.loggers:
            return False
        connector = getattr(trainer, "_logger_connector", None)
        if connector is None or trainer.fast_dev_run:
            return True
        return bool(connector.should_update_logs)

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
