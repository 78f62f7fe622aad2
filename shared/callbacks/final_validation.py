"""Validate (and so checkpoint) the last training epoch, whatever `check_val_every_n_epoch` is.

Lightning validates only on multiples of `check_val_every_n_epoch`, so a run of 1 epoch with
validation every 4 never logs the metric it returns, and a run of 50 epochs ends with epochs
49-50 trained but neither evaluated nor in `last.ckpt`. Validation is what writes both
checkpoints, so the last epoch must be a validation epoch.
"""

from __future__ import annotations

from lightning import Callback


class ValidateLastEpoch(Callback):
    """Switches validation on for the final epoch (`trainer.max_epochs`) when the cadence
    would skip it; the cadence is restored when fitting ends."""

    def __init__(self) -> None:
        self._every: int | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        every, last = trainer.check_val_every_n_epoch, trainer.max_epochs
        if every is None or every == 1 or last is None or last < 0:
            return
        if trainer.current_epoch == last - 1 and last % every != 0:
            self._every = every
            trainer.check_val_every_n_epoch = 1

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._every is not None:
            trainer.check_val_every_n_epoch, self._every = self._every, None
