"""Fixtures of the tracking tests (the export tests import them too)."""

from __future__ import annotations

import pytest

from tests.tracking.runs import TINY_DINO, TINY_MATCHING, shared_data_dir, tiny_run, wandb_env


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return shared_data_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def dino_run(tmp_path_factory):
    """DINO + test ViT, one epoch, csv logger: run dir and the live module."""
    return tiny_run(tmp_path_factory, "dino", "ssl", TINY_DINO)


@pytest.fixture(scope="session")
def matching_run(tmp_path_factory):
    """DOLG + test ResNet on synthetic postings, one epoch."""
    return tiny_run(tmp_path_factory, "matching", "matching", TINY_MATCHING)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, writing only under tmp_path."""
    env = wandb_env(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env
