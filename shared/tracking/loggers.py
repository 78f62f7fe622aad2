"""Logger helpers for a run: find one kind, close them all when the run ends."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def find_logger(loggers, kind: str):
    """The first logger whose class is `kind` (e.g. "WandbLogger"), or None."""
    for logger in loggers or []:
        if type(logger).__name__ == kind:
            return logger
    return None


def finish_loggers(loggers) -> None:
    """Close the W&B run a WandbLogger opened, so the next job of a sweep (same process)
    starts its own run instead of appending to this one, and an offline run is flushed."""
    wandb_logger = find_logger(loggers, "WandbLogger")
    if wandb_logger is not None and getattr(wandb_logger, "_experiment", None) is not None:
        import wandb

        if wandb.run is not None and wandb.run is wandb_logger._experiment:
            wandb.finish()
        wandb_logger._experiment = None
