"""Resuming: a last.ckpt of another module or model config is refused (through run()); a
damaged last.ckpt is set aside and an older complete checkpoint resumes."""

import logging

import pytest
import torch

from shared.instantiate import instantiate
from shared.resume import check_compatible
from shared.train import run
from tests.pipelines import TINY, TINY_SSL_DATA


def write_checkpoint(module, path):
    """What Lightning + EmbeddingModule.on_save_checkpoint put in a checkpoint's header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "module_class": f"{type(module).__module__}.{type(module).__qualname__}",
            "hyper_parameters": dict(module.hparams),
            "state_dict": module.state_dict(),
        },
        path,
    )


def last_ckpt(cfg):
    from pathlib import Path

    return Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"


def test_resume_from_another_module_is_refused(compose_cfg):
    other = compose_cfg("ssl", [*TINY_SSL_DATA, "module=dolg", "module.num_classes=12"])
    cfg = compose_cfg("ssl", [*TINY["ssl"], "logger=none"])
    write_checkpoint(instantiate(other.module, "module"), last_ckpt(cfg))
    with pytest.raises(
        ValueError,
        match=r"holds a shared\.modules\.metric_learning\."
        r"MetricLearningModule, but the config builds "
        r"selfsup\.dino\.DINOModule",
    ):
        run(cfg)


def test_resume_with_another_model_config_is_refused(compose_cfg):
    other = compose_cfg("ssl", [*TINY["ssl"], "module.out_dim=128"])
    cfg = compose_cfg("ssl", [*TINY["ssl"], "logger=none"])
    write_checkpoint(instantiate(other.module, "module"), last_ckpt(cfg))
    with pytest.raises(ValueError, match="out_dim: checkpoint=128 config=256"):
        run(cfg)


def test_values_read_from_the_data_are_not_a_mismatch(compose_cfg, tmp_path):
    # num_classes is null in the config (filled from the data at setup) but saved in the
    # checkpoint: a product-matching run must resume from its own last.ckpt.
    saved = compose_cfg("matching", [*TINY["matching"], "module.num_classes=12"])
    path = tmp_path / "last.ckpt"
    write_checkpoint(instantiate(saved.module, "module"), path)
    cfg = compose_cfg("matching", TINY["matching"])
    check_compatible(str(path), instantiate(cfg.module, "module"))
    bigger = compose_cfg("matching", [*TINY["matching"], "module.model.embedding_dim=64"])
    with pytest.raises(ValueError, match="model: checkpoint="):
        check_compatible(str(path), instantiate(bigger.module, "module"))


def _checkpoints(tmp_path, truncate_last: bool):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"epoch": 3, "weights": torch.randn(1000)}, folder / "epoch_003.ckpt")
    torch.save({"epoch": 5, "weights": torch.randn(1000)}, folder / "last.ckpt")
    if truncate_last:
        data = (folder / "last.ckpt").read_bytes()
        (folder / "last.ckpt").write_bytes(data[: len(data) // 3])  # a copy cut short
    return folder


def test_a_damaged_last_ckpt_is_set_aside_and_an_older_one_resumes(tmp_path, caplog):
    from shared.resume import resume_checkpoint

    folder = _checkpoints(tmp_path, truncate_last=True)
    with caplog.at_level(logging.WARNING):
        chosen = resume_checkpoint(None, tmp_path)
    assert chosen == str(folder / "epoch_003.ckpt")
    (aside,) = folder.glob("last.ckpt.damaged-*")  # kept for inspection, never deleted
    assert aside.stat().st_size > 0 and not (folder / "last.ckpt").exists()
    assert "last.ckpt is damaged" in caplog.text and "epoch_003.ckpt" in caplog.text
    assert torch.load(chosen, weights_only=True)["epoch"] == 3


def test_an_intact_last_ckpt_resumes_and_an_explicit_damaged_one_is_named(tmp_path):
    from shared.resume import resume_checkpoint

    folder = _checkpoints(tmp_path, truncate_last=False)
    assert resume_checkpoint(None, tmp_path) == str(folder / "last.ckpt")
    bad = folder / "bad.ckpt"
    bad.write_bytes((folder / "last.ckpt").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"ckpt_path='.*bad.ckpt' cannot be read: BadZipFile"):
        resume_checkpoint(str(bad), tmp_path)


def test_each_module_class_declares_what_a_resume_must_match(compose_cfg, tmp_path):
    """SimCLR's declared `resume_sensitive` keys are checked; its lr is free to change."""
    small = ["module=simclr", "module.proj_hidden_dim=16", "backbone.name=test_resnet"]
    saved = compose_cfg("ssl", [*TINY_SSL_DATA, *small, "module.proj_output_dim=8"])
    path = tmp_path / "last.ckpt"
    write_checkpoint(instantiate(saved.module, "module"), path)
    other_lr = compose_cfg(
        "ssl", [*TINY_SSL_DATA, *small, "module.proj_output_dim=8", "module.base_lr=1"]
    )
    check_compatible(str(path), instantiate(other_lr.module, "module"))
    wider = compose_cfg("ssl", [*TINY_SSL_DATA, *small, "module.proj_output_dim=16"])
    with pytest.raises(ValueError, match="proj_output_dim: checkpoint=8 config=16"):
        check_compatible(str(path), instantiate(wider.module, "module"))
