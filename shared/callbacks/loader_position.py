"""A run resumed in the middle of an epoch continues that epoch's data order.

Lightning saves the state of a train loader that has one (`shared.data.resumable`, or the
streaming loader of `shared.data.streaming`) with every checkpoint, but hands it back only if
the loader is made after the checkpoint is read; a module whose `configure_optimizers` reads
`trainer.estimated_stepping_batches` (both of ours: the schedules need the number of steps)
makes it before. This callback reads the saved state from the checkpoint and gives it to the
train loader when training starts, before its first batch. A loader whose order is a function
of the epoch it is told (`set_epoch`: the streaming one; samplers get theirs from Lightning)
is told the trainer's epoch as each epoch starts.
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
        stateful = [dl for dl in _train_loaders(trainer) if hasattr(dl, "load_state_dict")]
        for loader, state in zip(stateful, states, strict=True):
            loader.load_state_dict(state)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        for loader in _train_loaders(trainer):
            if callable(getattr(loader, "set_epoch", None)):
                loader.set_epoch(trainer.current_epoch)


def _train_loaders(trainer) -> list:
    loaders = trainer.train_dataloader
    if isinstance(loaders, dict):
        return list(loaders.values())
    if not isinstance(loaders, (list, tuple)):
        return [loaders]
    return list(loaders)
