"""What a run reports about itself: model size up front, the optimised metric at the end."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def parameter_counts(module: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"params/total": total, "params/trainable": trainable,
            "params/frozen": total - trainable}


def log_run_summary(module, loggers, cfg) -> dict[str, int]:
    counts = parameter_counts(module)
    log.info("Model %s: %s", type(module).__name__,
             ", ".join(f"{k.split('/')[1]} {v / 1e6:.2f}M" for k, v in counts.items()))
    for logger in loggers:
        logger.log_hyperparams(counts)
    return counts


def final_metric(trainer, name: str | None) -> float | None:
    """The value of `name` the sweeper optimises: the best checkpoint's score when it is the
    monitored metric, else the last logged value."""
    if not name:
        return None
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.monitor == name and ckpt.best_model_score is not None:
        return float(ckpt.best_model_score)
    value = trainer.callback_metrics.get(name)
    if value is None:
        available = sorted(trainer.callback_metrics)
        raise KeyError(f"optimized_metric={name!r} was never logged; logged: {available}")
    return float(value)


def best_checkpoint(trainer) -> str | None:
    """Best checkpoint path to test, or None (test the weights in memory)."""
    ckpt = trainer.checkpoint_callback
    if trainer.fast_dev_run or ckpt is None:
        return None
    return ckpt.best_model_path or None
