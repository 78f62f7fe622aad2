"""What a run reports about itself: model size up front, the optimised metric at the end."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def parameter_counts(module: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {
        "params/total": total,
        "params/trainable": trainable,
        "params/frozen": total - trainable,
    }


@torch.no_grad()
def flop_counts(module: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    """FLOPs of one `module.embed(images)` call, per image (torch's FlopCounterMode).

    Counts matmuls and convolutions, a multiply-add as 2 FLOPs (twice the "FLOPs" of fvcore
    and most paper tables, which count multiply-adds). Attention runs on the math backend
    while counting, so fused SDPA kernels (not counted on CPU) are seen as their matmuls.
    The module is switched to eval mode for the count and back, so BatchNorm statistics
    are not touched.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            module.embed(images)
    finally:
        for m, mode in modes.items():
            m.training = mode
    total = counter.get_total_flops()
    return {"flops/per_image": total / max(1, len(images))}


def log_run_summary(module, loggers, cfg=None, images: torch.Tensor | None = None) -> dict:
    """Parameter counts (and FLOPs of `embed` on `images`, when given) to the console and
    every logger's hyper-parameters."""
    counts: dict = parameter_counts(module)
    if images is not None:
        counts.update(flop_counts(module, images))
    text = ", ".join(
        f"{k.split('/')[1]} {v / 1e6:.2f}M" for k, v in counts.items() if k.startswith("params/")
    )
    if "flops/per_image" in counts:
        text += f"; embed {counts['flops/per_image'] / 1e9:.3f} GFLOPs per image"
    log.info("Model %s: %s", type(module).__name__, text)
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
