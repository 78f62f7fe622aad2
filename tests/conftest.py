"""Shared fixtures: compose a pipeline's config the way run.py does, pointed at tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import shared.config  # noqa: F401  (registers resolvers, sets PROJECT_ROOT)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# One intra-op thread: the DDP tests fork ranks from this process, and a child forked from a
# parent whose OpenMP pool has several threads can hang in its first parallel region.
torch.set_num_threads(1)

# Small, quick settings every pipeline test can start from.
TINY_SYNTHETIC = [
    "data.source.num_families=6",
    "data.source.groups_per_family=2",
    "data.source.min_instances=3",
    "data.source.max_instances=5",
    "data.source.image_size=32",
    "data.image_size=32",
    "data.batch_size=8",
    "data.eval_batch_size=16",
]


def compose_config(config_name: str, overrides: list[str], tmp_path: Path, data_dir=None):
    """Compose like @hydra.main: hydra config set, output and data dirs under tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.data_dir = str(data_dir or tmp_path / "data")
        del cfg.hydra
    return cfg


@pytest.fixture
def compose_cfg(tmp_path):
    def make(config_name: str, overrides: list[str] = (), data_dir=None):
        return compose_config(config_name, list(overrides), tmp_path, data_dir)

    yield make
    GlobalHydra.instance().clear()
