"""Every option of every config group composes with both primary configs."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF

PRIMARIES = ["ssl", "matching"]
# Groups that only make sense for one pipeline, and options that need launcher plugins
# or a sweeper are still composed: composing must never fail.
GROUPS = [
    "data",
    "data/source",
    "backbone",
    "module",
    "embedding",
    "head",
    "trainer",
    "callbacks",
    "logger",
    "debug",
    "experiment",
    "hparams_search",
    "hydra/launcher",
]


def options(group: str) -> list[str]:
    folder = CONF / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


# Groups whose options are shared by both pipelines are composed with `ssl` only.
MATCHING_GROUPS = ["data", "module", "head", "callbacks", "hparams_search", "experiment"]


def cases():
    for primary in PRIMARIES:
        for group in GROUPS if primary == "ssl" else MATCHING_GROUPS:
            for option in options(group):
                if primary == "matching" and option.startswith(("dino", "ssl")):
                    continue
                yield pytest.param(primary, group, option, id=f"{primary}-{group}={option}")


@pytest.mark.parametrize("primary,group,option", list(cases()))
def test_group_option_composes(compose_cfg, primary, group, option):
    if group in ("head", "embedding"):
        target = "head" if group == "head" else "model"
        override = f"{group}@module.{target}={option}"
        if primary == "ssl":
            override = f"module=dolg {override}"
        overrides = override.split()
    elif group.startswith("hydra/"):
        overrides = [f"{group}={option}"]
    else:
        overrides = [f"{group}={option}"]
    cfg = compose_cfg(primary, overrides)
    assert cfg.pipeline in ("ssl", "product-matching")
    # Everything but required user values (???) resolves.
    container = OmegaConf.to_container(cfg, resolve=False)
    assert container["module"]["_target_"]
    for key in ("module", "trainer", "callbacks"):
        node = cfg.get(key)
        if node is not None:
            OmegaConf.to_container(node, resolve=True, throw_on_missing=False)


def test_struct_mode_rejects_unknown_keys(compose_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_cfg("ssl", ["module.no_such_key=1"])


def test_experiment_files_are_global_packages():
    for path in (CONF / "experiment").glob("*.yaml"):
        assert path.read_text().startswith("# @package _global_"), path


def test_every_target_imports():
    """Each `_target_` written in conf/ resolves to a real class or function."""
    import hydra

    for path in Path(CONF).rglob("*.yaml"):
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith("_target_:"):
                target = line.split(":", 1)[1].strip()
                if target.startswith("hydra_plugins"):
                    continue
                assert hydra.utils.get_object(target) is not None, (path, target)
