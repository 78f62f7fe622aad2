"""Compose a pipeline's config outside `@hydra.main` (tools: LR finder, benchmarks)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

PIPELINES = {"ssl": "ssl", "matching": "matching", "product-matching": "matching"}


def compose_pipeline(
    pipeline: str, overrides: list[str], out_dir: str | None = None, kind: str = "lr_find"
):
    """The pipeline's config with `overrides` and `paths.output_dir` set to `out_dir` (default
    logs/<pipeline>/<task>/<kind>/<time>/), as `@hydra.main` would compose it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from shared.config import REPO_ROOT, prepare_environment

    prepare_environment()
    if pipeline not in PIPELINES:
        raise ValueError(f"--pipeline must be one of {sorted(PIPELINES)}, got {pipeline!r}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name=PIPELINES[pipeline], overrides=overrides, return_hydra_config=True
        )
    HydraConfig.instance().set_config(cfg)  # for ${hydra:runtime.choices...}
    with open_dict(cfg):
        if out_dir is None:
            stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
            out_dir = f"{cfg.paths.log_dir}/{cfg.pipeline}/{cfg.task_name}/{kind}/{stamp}"
        cfg.paths.output_dir = str(Path(out_dir).resolve())
        del cfg.hydra
    return cfg
