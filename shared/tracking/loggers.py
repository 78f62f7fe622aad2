"""Logger helpers for a run: find one kind, close them all when the run ends."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from shared.atomic import temp_name

log = logging.getLogger(__name__)


def find_logger(loggers, kind: str):
    """The first logger whose class is `kind` (e.g. "WandbLogger"), or None."""
    for logger in loggers or []:
        if type(logger).__name__ == kind:
            return logger
    return None


def persistent_id(path: str | Path, make: Callable[[], str]) -> str:
    """The id stored in `path`, or a new one from `make()` stored there first.

    A tracker's run id kept in the run directory: a restarted or requeued run continues the
    same tracked run. Created by a hard link, which fails if the file exists, so processes
    starting together (DDP ranks) all end up with the one id that won.
    """
    path = Path(path)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(path)
        tmp.write_text(make())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return path.read_text().strip()


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
