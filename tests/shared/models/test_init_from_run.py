"""`backbone.init_from_run`: a metric-learning net starts from another run's embedding backbone
(a DINO run: its teacher, not its student), only when both runs' backbone groups agree."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from shared.models.backbone import TimmBackbone
from shared.modules.metric_learning import MetricLearningModule

BACKBONE = {"name": "test_resnet", "pretrained": False, "pretrained_path": None}


def fake_run(root, target="selfsup.dino.DINOModule", backbone=None, prefixes=None):
    """A run directory as run() leaves it: its config and one checkpoint of random weights."""
    prefixes = prefixes or ("teacher_backbone.model.", "student_backbone.model.")
    (root / ".hydra").mkdir(parents=True)
    (root / "checkpoints").mkdir()
    cfg = {"backbone": backbone or BACKBONE, "module": {"_target_": target}}
    OmegaConf.save(OmegaConf.create(cfg), root / ".hydra" / "config.yaml")
    weights = {}
    for i, prefix in enumerate(prefixes):
        torch.manual_seed(100 + i)
        net = TimmBackbone("test_resnet")
        for p in net.parameters():  # far from any fresh initialisation
            p.data.normal_()
        weights[prefix] = net.model.state_dict()
    state = {p + k: v for p, sd in weights.items() for k, v in sd.items()}
    torch.save({"state_dict": state, "callbacks": {}}, root / "checkpoints" / "last.ckpt")
    return root, weights


def metric_module(model_type="dolg", resuming=False, **backbone):
    model = {"type": model_type, "embedding_dim": 12}
    if model_type == "dolg":
        model.update(local_dim=16, global_dim=16)
    module = MetricLearningModule(
        model=model,
        backbone={**BACKBONE, "features_only": model_type == "dolg", **backbone},
        head={"margin": 0.2, "scale": 30.0},
        num_classes=3,
        train_transform={"size": 32},
    )
    module.trainer = SimpleNamespace(ckpt_path="last.ckpt" if resuming else None)
    return module


@pytest.mark.parametrize("model_type", ["dolg", "cgd"])
def test_backbone_starts_from_the_dino_teacher(tmp_path, model_type):
    run_dir, weights = fake_run(tmp_path / "dino")
    module = metric_module(model_type, init_from_run=str(run_dir))
    module.setup("fit")
    got = module.net.backbone.model.state_dict()
    teacher = weights["teacher_backbone.model."]
    assert set(got) == set(teacher)
    assert all(torch.equal(got[k], teacher[k]) for k in teacher)
    student = weights["student_backbone.model."]
    assert not any(torch.equal(got[k], student[k]) for k in student if k.endswith(".weight"))


def test_backbone_of_a_metric_learning_run(tmp_path):
    target = "shared.modules.metric_learning.MetricLearningModule"
    run_dir, weights = fake_run(tmp_path / "dolg", target, prefixes=("net.backbone.model.",))
    module = metric_module(init_from_run=str(run_dir))
    module.setup("fit")
    got = module.net.backbone.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in weights["net.backbone.model."].items())


def test_a_resumed_run_keeps_its_own_weights(tmp_path):
    run_dir, _ = fake_run(tmp_path / "dino")
    module = metric_module(resuming=True, init_from_run=str(run_dir))
    before = {k: v.clone() for k, v in module.net.backbone.state_dict().items()}
    module.setup("fit")
    after = module.net.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_another_backbone_is_refused_by_key_and_values(tmp_path):
    run_dir, _ = fake_run(tmp_path / "dino", backbone={**BACKBONE, "name": "resnet18"})
    module = metric_module(init_from_run=str(run_dir))
    with pytest.raises(ValueError) as err:
        module.setup("fit")
    msg = str(err.value)
    assert "backbone.name='test_resnet' here" in msg and "backbone.name='resnet18'" in msg


def test_img_size_mismatch_is_refused(tmp_path):
    run_dir, _ = fake_run(tmp_path / "dino", backbone={**BACKBONE, "img_size": 64})
    module = metric_module(init_from_run=str(run_dir), img_size=32)
    with pytest.raises(ValueError, match="backbone.img_size=32 here.*img_size=64"):
        module.setup("fit")


def test_pretrained_path_and_init_from_run_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="pretrained_path=.*init_from_run=.*both set"):
        metric_module(init_from_run=str(tmp_path), pretrained_path=str(tmp_path / "w.pth"))


def test_not_a_run_directory(tmp_path):
    module = metric_module(init_from_run=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is not a run directory"):
        module.setup("fit")


def test_a_backbone_built_directly_refuses_it():
    with pytest.raises(ValueError, match="init_from_run"):
        TimmBackbone("test_resnet", init_from_run="/some/run")
