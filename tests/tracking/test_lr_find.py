"""The LR finder command writes its plot and a suggestion; the finder's lr drives the run."""

from __future__ import annotations

import json

import pytest

import shared.tracking.lr_find as lr_find_mod
from tests.conftest import TINY_SYNTHETIC


@pytest.fixture
def tiny_overrides(tiny_data):
    return TINY_SYNTHETIC + [f"paths.data_dir={tiny_data}"]


def test_lr_find_command_metric_learning(tmp_path, tiny_overrides):
    out = tmp_path / "lr"
    result = lr_find_mod.main(
        [
            "--pipeline",
            "ssl",
            "module=dolg",  # overrides between flags, as the README's line has them
            "--out-dir",
            str(out),
            "--num-training",
            "16",
            "--min-lr",
            "1e-5",
            "--max-lr",
            "1",
            "backbone.name=test_resnet",
            "module.model.local_dim=32",
            "module.model.global_dim=32",
            "module.model.embedding_dim=32",
            *tiny_overrides,
        ]
    )
    assert (out / "lr_find.png").stat().st_size > 1000
    saved = json.loads((out / "lr_find.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert len(saved["lr"]) == len(saved["loss"]) == 16
    assert saved["lr"] == sorted(saved["lr"]) and saved["lr"][0] == pytest.approx(1e-5)
    assert saved["suggestion"] is not None and 1e-5 <= saved["suggestion"] <= 1
    assert saved["config"] == {"key": "module.lr", "value": saved["suggestion"]}


def test_finder_lr_overrides_dinos_own_schedule(tmp_path, tiny_overrides, monkeypatch):
    """DINO sets its scheduled lr every step; during the search the finder's lr must win."""
    seen = []

    def drive_and_record(module):
        original(module)
        start = module.on_train_batch_start

        def recording(batch, batch_idx):
            out = start(batch, batch_idx)
            seen.append(module.trainer.optimizers[0].param_groups[0]["lr"])
            return out

        module.on_train_batch_start = recording

    original = lr_find_mod.let_finder_drive_lr
    monkeypatch.setattr(lr_find_mod, "let_finder_drive_lr", drive_and_record)
    cfg = lr_find_mod.compose_pipeline(
        "ssl",
        tiny_overrides
        + [
            "backbone=vit_tiny",
            "backbone.name=test_vit",
            "module.out_dim=64",
            "module.hidden_dim=32",
            "module.bottleneck_dim=16",
            "module.multicrop.n_local=0",
        ],
        str(tmp_path / "lr"),
    )
    result = lr_find_mod.lr_find(cfg, num_training=6, min_lr=1e-6, max_lr=1e-1)
    assert seen[: len(result["lr"])] == pytest.approx(result["lr"])
    # lr = base_lr x global batch / 256 (data.batch_size=8, one device)
    assert lr_find_mod.config_override(cfg, 1e-3) == {
        "key": "module.base_lr",
        "value": pytest.approx(1e-3 * 256 / 8),
        "global_batch": 8,
    }


@pytest.mark.parametrize(
    "module,key,factor",
    [
        ("simclr", "module.base_lr", 256 / 8),
        ("dino", "module.base_lr", 256 / 8),
        ("cgd", "module.lr", 1),
    ],
)
def test_config_override_is_the_module_class_lr_key(tmp_path, tiny_overrides, module, key, factor):
    """The override names the hyper-parameter the module class declares (`lr_key`); the SSL
    methods' base_lr is the optimiser lr x 256 / global batch (data.batch_size=8, 1 device)."""
    cfg = lr_find_mod.compose_pipeline("ssl", [f"module={module}", *tiny_overrides], str(tmp_path))
    override = lr_find_mod.config_override(cfg, 1e-3)
    assert override["key"] == key and override["value"] == pytest.approx(1e-3 * factor)
