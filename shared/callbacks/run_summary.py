"""Parameter and FLOPs summary of the model, once, when a run first touches its data."""

from __future__ import annotations

import logging

import torch
from lightning import Callback

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


def log_run_summary(module, loggers, images: torch.Tensor | None = None) -> dict:
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


def eval_batch(datamodule, n: int) -> torch.Tensor:
    """Up to `n` un-augmented uint8 images of the evaluation split: store rows when the data
    module has a store (no loader workers started), else the first batch of its first
    validation loader."""
    store = getattr(datamodule, "store", None)
    rows = getattr(datamodule, "val_indices", None)
    if store is not None and rows is not None and len(rows):
        return torch.as_tensor(store.images[torch.as_tensor(rows[:n])])
    loaders = datamodule.val_dataloader()
    loader = next(iter(loaders.values())) if isinstance(loaders, dict) else loaders
    return next(iter(loader))["images"][:n]


class RunSummaryCallback(Callback):
    """Logs parameter counts and `embed` FLOPs per image to the console and every logger.

    Runs at the first validation or fit start, not at construction: the metric-learning
    module builds its network from the data (number of classes) in `setup`.
    """

    def __init__(self, n_images: int = 8) -> None:
        self.n_images = n_images
        self.summary: dict | None = None

    def _summarise(self, trainer, pl_module) -> None:
        if self.summary is not None:
            return
        if not trainer.is_global_zero:  # rank 0 reports; the others have the same model
            self.summary = {}
            return
        images = None
        if hasattr(pl_module, "embed") and trainer.datamodule is not None:
            try:
                images = eval_batch(trainer.datamodule, self.n_images).to(pl_module.device)
            except Exception as exc:  # a summary must never stop a run
                log.warning("No evaluation batch for the FLOPs count (%s): parameters only", exc)
        self.summary = log_run_summary(pl_module, trainer.loggers, images=images)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._summarise(trainer, pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._summarise(trainer, pl_module)
