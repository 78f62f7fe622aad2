"""A run resumed in the middle of an epoch continues that epoch's data order.

Lightning saves the state of a train loader that has one (`shared.data.resumable`) with every
checkpoint, but hands it back only if the loader is made after the checkpoint is read; a module
whose `configure_optimizers` reads `trainer.estimated_stepping_batches` (both of ours: the
schedules need the number of steps) makes it before. This callback reads the saved state from
the checkpoint and gives it to the train loader when training starts, before its first batch.
"""

from __future__ import annotations

from lightning import Callback


class LoaderPositionCallback(Callback):
    def __init__(self) -> None:
        self._states: list[dict] = []

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        self._states = fit_loop.get("state_dict", {}).get("combined_loader", [])

    def on_train_start(self, trainer, pl_module) -> None:
        states, self._states = self._states, []
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if not states or not trainer.fit_loop.restarted_mid_epoch:
            return  # a fresh run, or one resumed at an epoch's end: a new pass either way
        if done >= trainer.num_training_batches:
            return  # saved after the epoch's last step (at its validation): a new pass next
        loaders = trainer.train_dataloader
        if isinstance(loaders, dict):
            loaders = list(loaders.values())
        elif not isinstance(loaders, (list, tuple)):
            loaders = [loaders]
        stateful = [dl for dl in loaders if hasattr(dl, "load_state_dict")]
        for loader, state in zip(stateful, states, strict=True):
            loader.load_state_dict(state)
