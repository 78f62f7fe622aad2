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
    if not OmegaConf.has_resolver("stdout_is_tty"):
        # progress bars for a terminal; plain log lines (callbacks/progress_log) elsewhere
        OmegaConf.register_new_resolver("stdout_is_tty", lambda: sys.stdout.isatty())


def prepare_environment(wandb_online: bool = False) -> None:
    """Project root for `paths.*`; W&B offline unless the user opted in."""
    os.environ.setdefault("PROJECT_ROOT", str(REPO_ROOT))
    if not wandb_online:
        os.environ.setdefault("WANDB_MODE", "offline")


register_resolvers()
# faiss tries its AVX-512 build first and logs the failed import at INFO on every CPU without
# it: a ModuleNotFoundError line that reads like a fault. Its real failures are warnings.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
os.environ.setdefault("PROJECT_ROOT", str(REPO_ROOT))
