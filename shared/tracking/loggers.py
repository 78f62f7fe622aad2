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


def flat_config(cfg) -> dict[str, object]:
    """The resolved config as `{"data.batch_size": 64, ...}`: lists as text, so every logger
    (MLflow params, TensorBoard hparams, CSV, W&B) can take it."""
    from omegaconf import OmegaConf

    out: dict[str, object] = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, f"{name}.")
            else:
                out[name] = str(value) if isinstance(value, list) else value

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def log_config(loggers, cfg) -> None:
    """Every logger gets the full resolved config (seed, data, trainer, ...) as parameters."""
    params = flat_config(cfg)
    for logger in loggers or []:
        logger.log_hyperparams(params)


def finish_loggers(loggers) -> None:
    """Close the W&B run a WandbLogger opened, so the next job of a sweep (same process)
    starts its own run instead of appending to this one.

    `wandb.finish()` returns before W&B's service process has closed the run's transaction
    log (`run-*.wandb`, written in 32 KB blocks): a reader right after it (a notebook, a
    test, `wandb sync`) could find a short run's history missing. `wandb.teardown()` waits
    for the service to finish, so the files are complete when the run returns; the next
    `wandb.init` starts a new service.
    """
    wandb_logger = find_logger(loggers, "WandbLogger")
    if wandb_logger is not None and getattr(wandb_logger, "_experiment", None) is not None:
        import wandb

        if wandb.run is not None and wandb.run is wandb_logger._experiment:
            wandb.finish()
        wandb_logger._experiment = None
        wandb.teardown()
