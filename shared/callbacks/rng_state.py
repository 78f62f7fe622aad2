"""Random-number generator states inside every checkpoint, so a resumed run replays exactly.

Lightning checkpoints hold weights, optimiser, schedulers, loops and callback states, but no
RNG state: a run resumed from `last.ckpt` (SLURM requeue, a restart) would shuffle and augment
differently from the uninterrupted run from then on. This callback saves the torch (CPU and
CUDA), numpy and Python generators with the checkpoint and restores them on resume.

Exact from epoch-boundary checkpoints (what ModelCheckpoint writes after validation) and,
with the train loader's own position (`shared.data.resumable`), from mid-epoch ones (a
preemption, `every_n_train_steps`). Rank 0's states are saved and restored on every rank;
`seed_everything` gives all ranks the same streams in the first place.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from lightning import Callback


def collect_rng_states() -> dict:
    """Current generator states as tensors and plain values (loads with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGStateCallback(Callback):
    """Saves the RNG states with each checkpoint; restores them when training resumes.

    Restored at the first epoch start after loading, not at load time: on resume Lightning
    makes a data iterator, which draws from the generator, before the epoch the uninterrupted
    run starts from the saved state. A run resumed mid-epoch gets no epoch start: there the
    states are restored when training starts, after that iterator was made and before its
    first batch is fetched (a loader that augments draws then).
    """

    def __init__(self) -> None:
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        return collect_rng_states()

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict or None

    def _restore(self) -> None:
        if self._pending is not None:
            restore_rng_states(self._pending)
            self._pending = None

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.fit_loop.restarted_mid_epoch:
            self._restore()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._restore()
