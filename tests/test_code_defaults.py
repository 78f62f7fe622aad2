"""Code defaults equal the YAML: a module, data module or callback built in a notebook without
arguments is the recipe the command line runs.

For every `_target_` of this project in conf/, each plain value the YAML sets (not an
interpolation) must equal the default of that parameter in the class's own signature; a dict
passed as keyword arguments to another class or function (`multicrop`, `views`, `synthetic`,
`train_transform`) is checked against its defaults the same way.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import yaml

from tests.conftest import CONF

OURS = ("shared.", "selfsup.", "matching.")
META = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# Parameters that take a dict of another class's keyword arguments.
NESTED = {
    ("selfsup.dino.DINOModule", "multicrop"): "shared.data.augment.MultiCrop",
    ("selfsup.simclr.SimCLRModule", "views"): "selfsup.simclr.simclr_views",
    ("shared.modules.metric_learning.MetricLearningModule", "train_transform"): (
        "shared.data.augment.TrainTransform"
    ),
    (
        "shared.data.sources.PostingsSource",
        "synthetic",
    ): "shared.data.synthetic.SyntheticProductsSpec",
}


def load(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def own_defaults(cls) -> dict:
    """Defaults of the parameters the class (or function) itself declares."""
    init = cls.__init__ if inspect.isclass(cls) else cls
    if not getattr(init, "__module__", "").startswith(OURS):
        return {}  # a library's signature (e.g. a Lightning logger subclass): not ours to match
    return {
        name: p.default
        for name, p in inspect.signature(init).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def targets(node, where: str):
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str) and target.startswith(OURS):
            yield where, node
        for key, value in node.items():
            yield from targets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from targets(value, f"{where}[{i}]")


def plain(value) -> bool:
    text = yaml.safe_dump(value)
    return "${" not in text


def normal(value):
    return list(value) if isinstance(value, tuple) else value


def mismatches(cls_path: str, values: dict, where: str) -> list[str]:
    defaults = own_defaults(load(cls_path))
    out = []
    for key, value in values.items():
        if key in META or key not in defaults:
            continue
        nested = NESTED.get((cls_path, key))
        if nested and isinstance(value, dict):
            out += mismatches(nested, value, f"{where}.{key}")
        elif plain(value) and normal(defaults[key]) != value:
            out.append(f"{where}.{key}: YAML {value!r}, code {defaults[key]!r}")
    return out


FILES = sorted(CONF.rglob("*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(CONF)) for p in FILES])
def test_code_defaults_equal_the_yaml(path):
    data = yaml.safe_load(path.read_text()) or {}
    found = []
    for where, node in targets(data, str(path.relative_to(CONF))):
        found += mismatches(node["_target_"], node, where)
    assert not found, "\n".join(found)
