"""Save `last.ckpt` when the scheduler warns of a preemption or time limit, then let it requeue.

Under SLURM, submitit catches the warning signal (USR2, `signal_delay_s` before the limit) and
requeues the job, which resumes from `last.ckpt`. Alone, that loses everything since the last
validation. This callback puts itself in front of submitit's handler while training runs: the
signal only marks a request; at the end of the current training step every rank saves
`last.ckpt` together and then the scheduler's handler runs (submitit requeues and exits). With
the train loader's position in the checkpoint (`shared.data.resumable`), the requeued job
continues the same epoch from the next batch: a preemption costs the current step. A signal
during an epoch's last step or its validation is acted on after the next epoch's first step:
Lightning resumes a checkpoint taken at the last step, or at the epoch's end after its
validation, as a finished epoch without replaying exactly (the next epoch's data order and
generators differ).

Nothing changes where no handler is installed for the signal (not under a scheduler), nor
outside training: there the scheduler's handler gets the signal at once, as before.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

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

    def on_train_end(self, trainer, pl_module) -> None:
        handler, self._scheduler_handler = self._scheduler_handler, None
        if handler is not None:
            signal.signal(self.signum, handler)
            if self._requested:  # came after the last save point: the scheduler's turn
                self._requested = False
                handler(self.signum, None)

    def _save_and_hand_over(self, trainer) -> None:
        if self._scheduler_handler is None:
            return
        requested = self._requested
        if trainer.world_size > 1:  # the signal reaches ranks at different steps: agree
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        trainer.save_checkpoint(self.path)
        log.warning(
            "Saved %s at epoch %d, step %d; handing the signal to the scheduler",
            self.path,
            trainer.current_epoch,
            trainer.global_step,
        )
        handler, self._scheduler_handler, self._requested = self._scheduler_handler, None, False
        signal.signal(self.signum, handler)
        handler(self.signum, None)  # submitit: rank 0 requeues the job and exits
