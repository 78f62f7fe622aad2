"""Config-time set-up shared by every entry point: resolvers and offline defaults."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("not"):
        OmegaConf.register_new_resolver("not", lambda x: not x)
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", lambda a, b: a * b)  # SLURM memory per node
    if not OmegaConf.has_resolver("stdout_is_tty"):
        # progress bars for a terminal; plain log lines (callbacks/progress_log) elsewhere
        OmegaConf.register_new_resolver("stdout_is_tty", lambda: sys.stdout.isatty())


def require_int(key: str, value, minimum: int | None = None, allow: tuple = ()) -> int:
    """`value` as an int, or a ValueError naming the key, the value and what was expected.

    Hydra passes `data.batch_size=abc` on as a string and `trainer.max_epochs=1.5` as a
    float; without this they fail deep inside a loader or a loop with no key named."""
    if value in allow:
        return value
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or (minimum is not None and value < minimum):
        expected = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        if allow:
            expected += " or " + " or ".join(repr(a) for a in allow)
        raise ValueError(f"{key}={value!r}: expected {expected}")
    return value


def check_trainer_config(trainer_cfg) -> None:
    """The trainer values a user types most, checked before anything is built."""
    require_int("trainer.max_epochs", trainer_cfg.get("max_epochs"), 1, allow=(-1, None))
    every = trainer_cfg.get("check_val_every_n_epoch")
    require_int("trainer.check_val_every_n_epoch", every, 1, allow=(None,))
    require_int("trainer.devices", trainer_cfg.get("devices"), 1, allow=("auto", -1))
    require_int("trainer.num_nodes", trainer_cfg.get("num_nodes", 1), 1)


def prepare_environment(wandb_online: bool = False) -> None:
    """Project root for `paths.*`; W&B offline unless the user opted in."""
    os.environ.setdefault("PROJECT_ROOT", str(REPO_ROOT))
    if not wandb_online:
        os.environ.setdefault("WANDB_MODE", "offline")


register_resolvers()
# faiss tries its AVX-512 build first and logs the failed import at INFO on every CPU without
# it: a ModuleNotFoundError line that reads like a fault. Its real failures are warnings.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)


class _DropAdverts(logging.Filter):
    """Lightning prints an advertisement for its cloud logger at every run's start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())
os.environ.setdefault("PROJECT_ROOT", str(REPO_ROOT))
