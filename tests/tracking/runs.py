"""Tiny runs for the tracking, notebook and export tests: seconds on a 2-core CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, TINY_SYNTHETIC, compose_config

# One short epoch that still evaluates (kNN / F1) and checkpoints; no test stage.
SHORT = [
    "trainer.max_epochs=1",
    "trainer.check_val_every_n_epoch=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "eval_at_init=false",
    "test=false",
]

# DINO on timm's test ViT (6 blocks, 64-d, 2 heads): a real ViT for the attention maps.
TINY_DINO = (
    TINY_SYNTHETIC
    + SHORT
    + [
        "data.val_fraction=0.5",  # two queries per class, so Recall@K has positives
        "optimized_metric=val/knn_top1@10",  # the bank (~17 images) caps k = 20 at 17
        "backbone=vit_tiny",
        "backbone.name=test_vit",
        "module.out_dim=128",
        "module.hidden_dim=64",
        "module.bottleneck_dim=32",
        "module.multicrop.global_size=32",
        "module.multicrop.local_size=16",
        "module.multicrop.n_local=2",
    ]
)

# DOLG on timm's test ResNet, on synthetic postings (5 folds of 2-3 groups each).
TINY_MATCHING = SHORT + [
    "data.source.synthetic.num_families=6",
    "data.source.synthetic.groups_per_family=2",
    "data.source.synthetic.image_size=32",
    "data.image_size=32",
    "data.batch_size=8",
    "data.eval_batch_size=32",
    "backbone.name=test_resnet",
    "module.model.local_dim=32",
    "module.model.global_dim=32",
    "module.model.embedding_dim=32",
]


def wandb_env(root: Path) -> dict[str, str]:
    """W&B offline with every folder it writes under `root` (not ~/.local, ~/.cache)."""
    return {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(root / "wandb_dir"),
        "WANDB_DATA_DIR": str(root / "wandb_data"),
        "WANDB_CACHE_DIR": str(root / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(root / "wandb_config"),
        "WANDB_DISABLE_GIT": "true",
    }


def run_in_process(cfg) -> float | None:
    """`shared.train.run(cfg)` plus the `.hydra/config.yaml` that @hydra.main would write."""
    from shared.train import run

    out = Path(cfg.paths.output_dir)
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml", resolve=True)
    try:
        return run(cfg)
    finally:
        import wandb

        if wandb.run is not None:  # a failed run must not leak into the next test
            wandb.finish()


def run_script(
    script: str,
    overrides: list[str],
    run_dir: Path,
    data_dir: Path,
    env: dict | None = None,
    timeout: int = 600,
) -> Path:
    """`python <script> overrides` in a subprocess, as a user runs it; returns the run dir."""
    cmd = [
        sys.executable,
        str(REPO / script),
        *overrides,
        f"hydra.run.dir={run_dir}",
        f"paths.data_dir={data_dir}",
    ]
    result = subprocess.run(
        cmd,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return run_dir


@dataclass
class TinyRun:
    run_dir: Path
    module: object  # the live LightningModule run() trained (weights as after its last stage)
    data_dir: Path


_RUNS: dict[str, TinyRun] = {}


def shared_data_dir(factory) -> Path:
    """One data folder (image stores, synthetic postings) for every tiny run of the session."""
    path = factory.getbasetemp() / "tiny_data"
    path.mkdir(exist_ok=True)
    return path


def tiny_run(factory, name: str, config: str, overrides: list[str]) -> TinyRun:
    """A finished in-process run, made once per session and shared by the test packages."""
    if name not in _RUNS:
        import shared.train

        root = factory.getbasetemp() / f"run_{name}"
        data = shared_data_dir(factory)
        cfg = compose_config(config, overrides, root, data_dir=data)
        built = {}

        def capture(cfg_node, key, **kwargs):
            built[key] = instantiate(cfg_node, key, **kwargs)
            return built[key]

        instantiate = shared.train.instantiate
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(shared.train, "instantiate", capture)
            run_in_process(cfg)
        _RUNS[name] = TinyRun(Path(cfg.paths.output_dir), built["module"], data)
    return _RUNS[name]
