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
    "net",
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
    if group in ("head", "net"):
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


# Each experiment file is a README recipe: its pipeline and the command line it spells out.
RECIPES = {
    "dino_resnet18": ("ssl", []),
    "dino_vit_tiny": (
        "ssl",
        [
            "backbone=vit_tiny",
            "module.student_drop_path=0.1",
            "module.base_lr=5.0e-4",
            "module.use_bn_in_head=false",
            "trainer.max_epochs=30",
        ],
    ),
    "matching_dolg": ("matching", []),
    "matching_cgd": ("matching", ["module=cgd"]),
    "matching_shopee_256_gpu": ("matching", ["data.image_size=256", "trainer=gpu"]),
    "matching_from_dino": (
        "matching",
        [
            "module.backbone_lr_mult=0.1",
            "module.layer_decay=0.7",
            "module.head_warmup_epochs=1",
        ],
    ),
}
# What the user must give on top of the recipe (the experiment leaves it ???).
GIVEN = {"matching_from_dino": ["backbone.init_from_run=/runs/dino"]}
SHOPEE = ["data.source.csv_path=/shopee/train.csv", "data.source.image_dir=/shopee/train_images"]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_experiment_equals_the_command_it_names(compose_cfg, name):
    """`experiment=<name>` composes with its pipeline into exactly the config of the README
    command it spells out (the run's name aside)."""
    primary, command = RECIPES[name]
    data = (SHOPEE if "shopee" in name else []) + GIVEN.get(name, [])
    recipe = compose_cfg(primary, [f"experiment={name}", *data, "task_name=x"])
    typed = compose_cfg(primary, [*command, *data, "task_name=x"])
    assert OmegaConf.to_container(recipe) == OmegaConf.to_container(typed)


def test_every_experiment_has_a_recipe():
    assert set(RECIPES) == set(options("experiment"))
