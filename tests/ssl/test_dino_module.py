"""DINO training mechanics on a real Trainer: EMA, frozen last layer, clipping, ViT + ResNet."""

import copy

import lightning as L
import pytest
import torch

from selfsup.dino import DINOModule
from shared.data.datamodule import StoreDataModule
from shared.data.sources import SyntheticSource

SMALL_CROPS = dict(global_size=32, local_size=16, n_local=2)


def tiny_datamodule(tmp_path):
    source = SyntheticSource(
        num_families=3, groups_per_family=2, min_instances=3, max_instances=4, image_size=32
    )
    return StoreDataModule(
        source, str(tmp_path / "stores"), image_size=32, batch_size=4, eval_batch_size=16
    )


class Probe(L.Callback):
    """Records what the optimiser step sees and the weights around it."""

    def __init__(self):
        self.records = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = {
            "student": copy.deepcopy(module.student_backbone.state_dict()),
            "teacher": copy.deepcopy(module.teacher_backbone.state_dict()),
            "last_v": module.student_head.last_layer.parametrizations.weight.original1.clone(),
        }

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        # Gradients are still those the optimiser used (zeroed before the next backward).
        norms = [p.grad.norm().item() for p in module.student_parameters() if p.grad is not None]
        frozen = module.student_head.last_layer.parametrizations.weight.original1.grad
        self.records.append(
            dict(
                student=copy.deepcopy(module.student_backbone.state_dict()),
                teacher=copy.deepcopy(module.teacher_backbone.state_dict()),
                last_v=module.student_head.last_layer.parametrizations.weight.original1.clone(),
                momentum=float(module._schedules["momentum"][trainer.global_step - 1]),
                before=self.before,
                max_norm=max(norms),
                last_grad=frozen,
            )
        )


@pytest.mark.parametrize(
    "backbone",
    [
        {"name": "resnet18"},
        pytest.param(
            {
                "name": "vit_tiny_patch16_224",
                "img_size": 32,
                "patch_size": 8,
                "dynamic_img_size": True,
            },
            marks=pytest.mark.slow,
            id="vit_tiny",
        ),
    ],
)
def test_dino_step_mechanics(tmp_path, backbone):
    module = DINOModule(
        backbone=backbone,
        out_dim=64,
        hidden_dim=32,
        bottleneck_dim=16,
        multicrop=SMALL_CROPS,
        clip_grad=0.05,
        momentum_teacher=0.9,
        warmup_epochs=0,
        freeze_last_layer_epochs=1,
    )
    probe = Probe()
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        callbacks=[probe],
        enable_progress_bar=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=tiny_datamodule(tmp_path))
    assert len(probe.records) == 2
    for r in probe.records:
        assert r["max_norm"] <= 0.05 + 1e-6  # per-parameter clipping
        assert r["last_grad"] is None  # last layer frozen in epoch 0
        assert torch.equal(r["last_v"], r["before"]["last_v"])
        m = r["momentum"]
        for name, t_new in r["teacher"].items():  # EMA: t' = m t + (1 - m) s'
            if not t_new.is_floating_point() or "running" in name:
                continue
            expected = m * r["before"]["teacher"][name] + (1 - m) * r["student"][name]
            torch.testing.assert_close(t_new, expected, rtol=1e-5, atol=1e-6)
    emb = module.embed(torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8))
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))


def test_teacher_is_a_copy_not_a_reference():
    module = DINOModule(
        backbone={"name": "resnet18"},
        out_dim=32,
        hidden_dim=16,
        bottleneck_dim=8,
        multicrop=SMALL_CROPS,
    )
    s = dict(module.student_backbone.named_parameters())
    for name, t in module.teacher_backbone.named_parameters():
        assert t.data_ptr() != s[name].data_ptr() and torch.equal(t, s[name])
        assert not t.requires_grad
    drop = [m for m in module.student_backbone.modules() if "DropPath" in type(m).__name__]
    teacher_drop = [m for m in module.teacher_backbone.modules() if "DropPath" in type(m).__name__]
    assert drop and not teacher_drop  # drop path on the student only
