"""Save `last.ckpt` when the scheduler warns of a preemption or time limit, then let it requeue.

Under SLURM, submitit catches the warning signal (USR2, `signal_delay_s` before the limit) and
requeues the job, which resumes from `last.ckpt`. Alone, that loses everything since the last
validation. This callback puts itself in front of submitit's handler while training runs: the
signal only marks a request; at the end of the current training step every rank saves
`last.ckpt` together and then the scheduler's handler runs (submitit requeues and exits). With
the train loader's position in the checkpoint (`shared.data.resumable`), the requeued job
continues the same epoch from the next batch: a preemption costs the current step. A signal
during an epoch's last step or its validation is handed over at the epoch's end when that
validation wrote `last.ckpt` (nothing is lost), else after the next epoch's first step: a
checkpoint taken at the last step itself, or after the epoch-end hooks, resumes in Lightning
as a finished epoch without replaying exactly (the next epoch's data order and generators
differ).

Nothing changes where no handler is installed for the signal (not under a scheduler), nor
outside training: there the scheduler's handler gets the signal at once, as before.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
from pathlib import Path

import torch
from lightning import Callback

log = logging.getLogger(__name__)


def preemption_signal() -> signal.Signals:
    """The signal submitit requeues on (its SUBMITIT_PREEMPT_SIGNAL, USR2 by default)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return signal.Signals["SIG" + name.removeprefix("SIG")]


class PreemptionCheckpoint(Callback):
    """`path`: where the run resumes from (`<output_dir>/checkpoints/last.ckpt`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.signum = preemption_signal()
        self._scheduler_handler = None
        self._requested = False

    def on_train_start(self, trainer, pl_module) -> None:
        handler = signal.getsignal(self.signum)
        usable = callable(handler) and threading.current_thread() is threading.main_thread()
        if trainer.world_size > 1:  # all ranks or none: the save is collective
            usable = trainer.strategy.reduce_boolean_decision(usable, all=True)
        if not usable:
            return  # no scheduler handler to defer (or signals cannot be caught here)
        self._scheduler_handler = handler
        signal.signal(self.signum, self._request)

    def _request(self, signum, frame) -> None:
        log.warning("Signal %s: saving last.ckpt at the end of this step", self.signum.name)
        self._requested = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._save_and_hand_over(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._scheduler_handler is None or not self._agreed(trainer):
            return
        written = self._written_step() if trainer.is_global_zero else -1
        if trainer.world_size > 1:  # rank 0's reading for all
            written = trainer.strategy.broadcast(written)
        if written == trainer.global_step:  # this epoch's validation saved the latest state
            self._hand_over(trainer)

    def _written_step(self) -> int:
        """The step `last.ckpt` holds (-1: none readable); only this entry is read (mmap)."""
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            return int(saved["global_step"])
        except (OSError, RuntimeError, KeyError, pickle.UnpicklingError):
            return -1

    def on_train_end(self, trainer, pl_module) -> None:
        handler, self._scheduler_handler = self._scheduler_handler, None
        if handler is not None:
            signal.signal(self.signum, handler)
            if self._requested:  # came after the last save point: the scheduler's turn
                self._requested = False
                handler(self.signum, None)

    def _agreed(self, trainer) -> bool:
        """Whether any rank got the signal (it reaches ranks at different steps)."""
        if trainer.world_size > 1:
            return trainer.strategy.reduce_boolean_decision(self._requested, all=False)
        return self._requested

    def _save_and_hand_over(self, trainer) -> None:
        if self._scheduler_handler is None or not self._agreed(trainer):
            return
        trainer.save_checkpoint(self.path)
        self._hand_over(trainer)

    def _hand_over(self, trainer) -> None:
        log.warning(
            "%s holds epoch %d, step %d; handing the signal to the scheduler",
            self.path,
            trainer.current_epoch,
            trainer.global_step,
        )
        handler, self._scheduler_handler, self._requested = self._scheduler_handler, None, False
        signal.signal(self.signum, handler)
        handler(self.signum, None)  # submitit: rank 0 requeues the job and exits
