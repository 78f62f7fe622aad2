"""Parameter and FLOPs summary of the model, once, when a run first touches its data."""

from __future__ import annotations

import logging

import torch
from lightning import Callback

from shared.summary import log_run_summary

log = logging.getLogger(__name__)


def eval_batch(datamodule, n: int) -> torch.Tensor:
    """Up to `n` un-augmented uint8 images of the evaluation split: store rows when the data
    module has a store (no loader workers started), else the first validation batch."""
    store = getattr(datamodule, "store", None)
    rows = getattr(datamodule, "val_indices", None)
    if store is not None and rows is not None and len(rows):
        return torch.as_tensor(store.images[torch.as_tensor(rows[:n])])
    loaders = datamodule.val_dataloader()
    loader = loaders[-1] if isinstance(loaders, (list, tuple)) else loaders
    return next(iter(loader))["images"][:n]


class RunSummaryCallback(Callback):
    """Logs parameter counts and `embed` FLOPs per image to the console and every logger.

    Runs at the first validation or fit start, not at construction: the metric-learning
    module builds its network from the data (number of classes) in `setup`.
    """

    def __init__(self, n_images: int = 8) -> None:
        self.n_images = n_images
        self.summary: dict | None = None

    def _summarise(self, trainer, pl_module) -> None:
        if self.summary is not None:
            return
        if not trainer.is_global_zero:  # rank 0 reports; the others have the same model
            self.summary = {}
            return
        images = None
        if hasattr(pl_module, "embed") and trainer.datamodule is not None:
            try:
                images = eval_batch(trainer.datamodule, self.n_images).to(pl_module.device)
            except Exception as exc:  # a summary must never stop a run
                log.warning("No evaluation batch for the FLOPs count (%s): parameters only", exc)
        self.summary = log_run_summary(pl_module, trainer.loggers, images=images)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._summarise(trainer, pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._summarise(trainer, pl_module)
