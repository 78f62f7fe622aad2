"""One plain log line per training epoch and per evaluation: readable where a progress bar is
not (nohup, tee, SLURM and CI logs) and kept in the run's `run.log`."""

from __future__ import annotations

import logging
import time

from lightning import Callback

log = logging.getLogger("progress")


def format_metrics(metrics: dict, prefix: str) -> str:
    items = sorted((k, float(v)) for k, v in metrics.items() if k.startswith(prefix))
    return ", ".join(f"{k}={v:.4g}" for k, v in items)


class ProgressLog(Callback):
    """`epoch 3/16: train/loss=5.61 (12.4 s)` after each training epoch and
    `epoch 3 val: val/knn_top1@20=0.167, ...` after each validation, rank 0 only."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            seconds = time.perf_counter() - self._start
            text = format_metrics(trainer.callback_metrics, "train/") or "no train metrics"
            log.info(
                "epoch %d/%s: %s (%.1f s)",
                trainer.current_epoch + 1,
                trainer.max_epochs,
                text,
                seconds,
            )

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        log.info("%s val: %s", _when(trainer), format_metrics(trainer.callback_metrics, "val/"))

    def on_test_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            log.info(
                "%s test: %s", _when(trainer), format_metrics(trainer.callback_metrics, "test/")
            )


def _when(trainer) -> str:
    """Which weights an evaluation scored: the untrained network, the epoch being trained,
    or a checkpoint (by its optimiser step)."""
    if trainer.global_step == 0:
        return "untrained"
    if trainer.state.fn == "fit":
        return f"epoch {trainer.current_epoch + 1}"
    return f"step {trainer.global_step}"
