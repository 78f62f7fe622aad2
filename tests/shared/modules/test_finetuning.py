"""Fine-tuning options of the metric-learning module: layer-wise lr decay over the backbone's
stages, and a head-only warm-up that leaves the backbone's weights exactly as they were."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from shared.modules.metric_learning import MetricLearningModule


def module(**options):
    torch.manual_seed(0)
    m = MetricLearningModule(
        model={"type": "dolg", "local_dim": 16, "global_dim": 16, "embedding_dim": 8},
        backbone={"name": "test_resnet", "features_only": True},
        head={"margin": 0.2, "scale": 30.0},
        num_classes=3,
        lr=1e-2,
        train_transform={"size": 32},
        **options,
    )
    m.trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=2)
    return m


def stage(name: str) -> int:
    """A ResNet parameter's stage from its name: the stem 0, layerN N."""
    return int(name[len("layer")]) if name.startswith("layer") else 0


def test_layer_decay_lrs_follow_the_stage_formula():
    m = module(layer_decay=0.5, backbone_lr_mult=0.1)
    opt = m.configure_optimizers()["optimizer"]
    lr_of = {id(p): g["initial_lr"] for g in opt.param_groups for p in g["params"]}
    named = list(m.net.backbone.model.named_parameters())
    deepest = max(stage(n) for n, _ in named)
    assert deepest == 4
    for name, p in named:
        expected = 1e-2 * 0.1 * 0.5 ** (deepest - stage(name))
        assert lr_of[id(p)] == pytest.approx(expected), name
    head = [
        g["initial_lr"] for g in opt.param_groups if any(p is m.head.weight for p in g["params"])
    ]
    assert head == [pytest.approx(1e-2 * 10.0)]
    assert len(lr_of) == sum(1 for _ in m.parameters())  # every parameter in one group


def test_layer_decay_is_checked():
    with pytest.raises(ValueError, match="layer_decay must be in"):
        module(layer_decay=1.5)


def step(m, opt, sched):
    x = torch.rand(6, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss, _ = m.head(m.net(x), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def test_head_warmup_holds_the_backbone_then_releases_it():
    m = module(head_warmup_epochs=1, warmup_epochs=0)
    with torch.no_grad():  # as if pretrained: no zero-initialised BN scale hides a gradient
        for p in m.net.backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cfg = m.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    start = {k: v.clone() for k, v in m.net.backbone.named_parameters()}
    head = m.head.weight.detach().clone()
    for _ in range(5):  # epoch 1 of 2 (10 steps): head only
        step(m, opt, sched)
    now = dict(m.net.backbone.named_parameters())
    assert all(torch.equal(now[k], v) for k, v in start.items())
    assert not torch.equal(m.head.weight, head)
    step(m, opt, sched)  # the first step of epoch 2
    assert sum(not torch.equal(now[k], v) for k, v in start.items()) == len(start)


def test_head_warmup_must_leave_backbone_epochs():
    m = module(head_warmup_epochs=2)
    with pytest.raises(ValueError, match="head_warmup_epochs=2 leaves no epoch"):
        m.configure_optimizers()
