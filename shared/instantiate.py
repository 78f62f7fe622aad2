"""Build objects from `_target_` config groups with errors that name the config key."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from shared.atomic import write_text

log = logging.getLogger(__name__)


def instantiate(cfg: DictConfig | Mapping, key: str, **kwargs):
    """`hydra.utils.instantiate(cfg)` that says which key and `_target_` failed to import."""
    if cfg is None:
        raise ValueError(f"config key {key!r} is empty")
    target = cfg.get("_target_") if isinstance(cfg, (DictConfig, Mapping)) else None
    if target is None:
        raise ValueError(f"config key {key!r} has no _target_")
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except hydra.errors.InstantiationException as exc:
        cause = exc.__cause__ or exc
        if "Error locating target" in str(exc) or isinstance(cause, ImportError):
            raise ImportError(
                f"{key}._target_={target!r} could not be imported: {cause}. Check the spelling "
                "and that the package is installed (pip install -e .)."
            ) from exc
        raise


def instantiate_group(cfg: DictConfig | None, key: str) -> list:
    """A group of named entries (callbacks, loggers) -> list of objects; null entries skipped."""
    if not cfg:
        return []
    out = []
    for name, entry in cfg.items():
        if isinstance(entry, DictConfig) and "_target_" in entry:
            log.info("Instantiating %s.%s <%s>", key, name, entry._target_)
            out.append(instantiate(entry, f"{key}.{name}"))
    return out


def save_resolved_config(cfg: DictConfig, output_dir: str | Path) -> Path:
    """Write the fully resolved config beside the checkpoints (for notebooks and load_run)."""
    path = Path(output_dir) / "config_resolved.yaml"
    return write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
