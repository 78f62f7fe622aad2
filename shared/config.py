"""Config-time set-up shared by every entry point: resolvers and offline defaults."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("not"):
        OmegaConf.register_new_resolver("not", lambda x: not x)


def prepare_environment(wandb_online: bool = False) -> None:
    """Project root for `paths.*`; W&B offline unless the user opted in."""
    os.environ.setdefault("PROJECT_ROOT", str(REPO_ROOT))
    if not wandb_online:
        os.environ.setdefault("WANDB_MODE", "offline")


register_resolvers()
os.environ.setdefault("PROJECT_ROOT", str(REPO_ROOT))
