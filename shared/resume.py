"""Where a run resumes from: an explicit `ckpt_path`, else its own `last.ckpt`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def resume_checkpoint(ckpt_path: str | None, output_dir: str | Path, auto: bool = True):
    """Explicit path wins; otherwise `<output_dir>/checkpoints/last.ckpt` when it exists.

    SLURM requeue and a plain restart with the same `hydra.run.dir` both land here.
    """
    if ckpt_path:
        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={str(path)!r} does not exist")
        return str(path)
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    if auto and last.is_file():
        log.info("Resuming from %s", last)
        return str(last)
    return None


def check_compatible(ckpt: str, module) -> None:
    """Refuse a checkpoint of another module class or with different model hyper-parameters."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    expected = f"{type(module).__module__}.{type(module).__qualname__}"
    found = state.get("module_class")
    if found and found != expected:
        raise ValueError(f"checkpoint {ckpt} holds a {found}, but the config builds {expected}")
    saved = state.get("hyper_parameters", {})
    current = dict(module.hparams)
    # A null in the config (e.g. num_classes) is filled from the data at setup: not a mismatch.
    diff = {
        k: (saved.get(k), current.get(k))
        for k in set(saved) | set(current)
        if k in RESUME_SENSITIVE and current.get(k) is not None and saved.get(k) != current.get(k)
    }
    if diff:
        lines = ", ".join(f"{k}: checkpoint={a!r} config={b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {ckpt} does not match the config ({lines})")


# Keys that change parameter shapes or meaning; others (lr, schedules) may change on resume.
RESUME_SENSITIVE = {
    "backbone",
    "out_dim",
    "hidden_dim",
    "bottleneck_dim",
    "head_layers",
    "embedding_dim",
    "num_classes",
    "train_labels",
    "model",
    "head",
    "subcenters",
}
