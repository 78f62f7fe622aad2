"""Collect the embeddings a module's validation/test step returns, gathered across ranks.

Every module's `validation_step` returns `{"embeddings", "labels", "index"}` from `embed()`;
evaluator callbacks subclass `EmbeddingCallback` and only implement `evaluate`, which gets the
outputs by loader name: a data module's `val_dataloader()` / `test_dataloader()` return a dict
(`{"bank": ..., "query": ...}`; product matching: `{"fold": ...}`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch
from lightning import Callback

from shared.distributed import gather_by_index


def loader_names(trainer) -> list[str]:
    """Names of the running evaluation's loaders, in Lightning's order: the hooks'
    `dataloader_idx` indexes this list (Lightning runs a dict of loaders in its order)."""
    loaders = trainer.test_dataloaders if trainer.testing else trainer.val_dataloaders
    if not isinstance(loaders, Mapping):
        raise TypeError(
            "the data module's val_dataloader() / test_dataloader() must return a dict of "
            f"loaders by name (e.g. {{'bank': ..., 'query': ...}}), got {type(loaders).__name__}"
        )
    return list(loaders)


class EmbeddingCallback(Callback):
    """Accumulates step outputs per dataloader; at epoch end gathers them once, by index."""

    def __init__(self, every_n_epochs: int = 1) -> None:
        self.every_n_epochs = every_n_epochs
        self._parts: dict[int, list[dict]] = defaultdict(list)
        self._stage: str | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Lightning calls setup before it restores a checkpoint's callback states, so
        # `load_state_dict` knows whether it resumes a fit or prepares a test.
        self._stage = stage

    @property
    def restoring_for_test(self) -> bool:
        """True while a test restores the checkpoint it scores: the evaluation history of
        this run (every validation so far) must then survive, not roll back to that epoch."""
        return self._stage == "test"

    def _due(self, trainer) -> bool:
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        return trainer.sanity_checking is False and (
            (trainer.current_epoch + 1) % self.every_n_epochs == 0 or last
        )

    def _reset(self, *_args) -> None:
        self._parts = defaultdict(list)

    def _collect(self, outputs, dataloader_idx: int) -> None:
        if outputs is None:
            return
        self._parts[dataloader_idx].append({k: v.detach() for k, v in outputs.items()})

    def gathered(self, trainer) -> dict[str, dict[str, torch.Tensor]]:
        """{loader name: {"index", "embeddings", "labels"}} de-duplicated, on the CPU."""
        names = loader_names(trainer)
        result = {}
        for i in sorted(self._parts):
            parts = self._parts[i]
            cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            index, emb, labels = gather_by_index(cat["index"], cat["embeddings"], cat["labels"])
            result[names[i]] = {
                "index": index.cpu(),
                "embeddings": emb.float().cpu(),
                "labels": labels.cpu(),
            }
        return result

    # Lightning hooks -----------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer, pl_module):
        self._reset()

    def on_test_epoch_start(self, trainer, pl_module):
        self._reset()

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        if self._due(trainer):
            self._collect(outputs, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._collect(outputs, dataloader_idx)

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._parts:
            self._log(trainer, pl_module, self.evaluate(self.gathered(trainer), trainer), "val")
        self._reset()

    def on_test_epoch_end(self, trainer, pl_module):
        if self._parts:
            self._log(trainer, pl_module, self.evaluate(self.gathered(trainer), trainer), "test")
        self._reset()

    def _log(self, trainer, pl_module, metrics: dict[str, float], stage: str) -> None:
        # Every rank computed the same numbers from the same gathered data: no reduction.
        for name, value in metrics.items():
            pl_module.log(
                f"{stage}/{name}",
                float(value),
                sync_dist=False,
                add_dataloader_idx=False,
                prog_bar=name == getattr(self, "prog", ""),
            )

    def evaluate(self, data: dict[str, dict[str, torch.Tensor]], trainer) -> dict[str, float]:
        raise NotImplementedError
