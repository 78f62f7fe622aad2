"""Checkpoints written beside their final name, fsynced, then renamed into place.

Lightning's own writer stages a local checkpoint in `$TMPDIR` and moves it; where `$TMPDIR`
is another file system (node-local disk or tmpfs on clusters) that move is a copy into
`last.ckpt`, so a kill during it leaves a truncated checkpoint, and the full-size temporary
file stays in `$TMPDIR`. Here the temporary file is in the checkpoint's folder, so the last
step is a rename: `last.ckpt` is the previous complete file or the new complete one.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from shared.atomic import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        protocol = get_filesystem(path).protocol
        if "file" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
            return super().save_checkpoint(checkpoint, path)  # object storage: fsspec's own
        with atomic_write(path, "wb") as handle:
            torch.save(checkpoint, handle)


def use_atomic_checkpoints(trainer) -> None:
    """Make `trainer` write checkpoints with `AtomicCheckpointIO`, unless it was given a
    checkpoint writer of another kind (a user's plugin wins)."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
