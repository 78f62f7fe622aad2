"""DINO training mechanics on a real Trainer: EMA, frozen last layer, clipping, ViT + ResNet."""

import copy

import lightning as L
import pytest
import torch

from selfsup.base import clip_grad_per_parameter_
from selfsup.dino import DINOModule
from shared.data.datamodule import StoreDataModule
from shared.data.sources import SyntheticSource

SMALL_CROPS = dict(global_size=32, local_size=16, n_local=2)


def small_dino(backbone: str = "test_resnet", **kwargs) -> DINOModule:
    """A DINO module with a small head and 32/16 px crops, for fast CPU fits."""
    return DINOModule(
        backbone={"name": backbone}, out_dim=32, hidden_dim=16, bottleneck_dim=8,
        multicrop=SMALL_CROPS, **kwargs,
    )  # fmt: skip


def tiny_datamodule(tmp_path):
    source = SyntheticSource(
        num_families=3, groups_per_family=2, min_instances=3, max_instances=4, image_size=32
    )
    return StoreDataModule(
        source,
        str(tmp_path / "stores"),
        image_size=32,
        batch_size=4,
        eval_batch_size=16,
        test_fraction=0.0,  # these tests train and validate only: keep the images for that
    )


class Probe(L.Callback):
    """Records what the optimiser step sees and the weights around it."""

    def __init__(self):
        self.records = []

    def _teacher_after_ema(self, module):
        # The teacher a step produced (the EMA follows the optimiser step) is read when the
        # next batch starts, or when the epoch ends.
        if self.records and "teacher" not in self.records[-1]:
            self.records[-1]["teacher"] = copy.deepcopy(module.teacher_backbone.state_dict())

    def on_train_epoch_end(self, trainer, module):
        self._teacher_after_ema(module)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._teacher_after_ema(module)
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
                last_v=module.student_head.last_layer.parametrizations.weight.original1.clone(),
                momentum=float(module._schedules["momentum"][trainer.global_step - 1]),
                before=self.before,
                max_norm=max(norms),
                last_grad=frozen,
            )
        )


def cpu_trainer(**overrides) -> L.Trainer:
    """A quiet CPU Trainer: 1 epoch of 1 batch, no validation, logger, checkpoints or bar."""
    kwargs = dict(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    return L.Trainer(**{**kwargs, **overrides})


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
    trainer = cpu_trainer(limit_train_batches=2, callbacks=[probe])
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
    module = small_dino("resnet18")
    s = dict(module.student_backbone.named_parameters())
    for name, t in module.teacher_backbone.named_parameters():
        assert t.data_ptr() != s[name].data_ptr() and torch.equal(t, s[name])
        assert not t.requires_grad
    drop = [m for m in module.student_backbone.modules() if "DropPath" in type(m).__name__]
    teacher_drop = [m for m in module.teacher_backbone.modules() if "DropPath" in type(m).__name__]
    assert drop and not teacher_drop  # drop path on the student only


class BatchKeys(L.Callback):
    def __init__(self):
        self.keys, self.shapes = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.keys.append(set(batch))
        if "views" in batch:
            self.shapes.append([tuple(v.shape) for v in batch["views"]])


def _fit_one_batch(module, tmp_path, **trainer_kwargs):
    probe = BatchKeys()
    dm = tiny_datamodule(tmp_path)
    trainer = cpu_trainer(callbacks=[probe], **trainer_kwargs)
    trainer.fit(module, datamodule=dm)
    return probe, dm


@pytest.mark.parametrize("augment_in", ["auto", "loader", "device"])
def test_augment_in_routes_multicrop(tmp_path, augment_in):
    """auto on the CPU and loader: the loader hands over ready views; device: uint8 images."""
    module = small_dino(augment_in=augment_in)
    probe, dm = _fit_one_batch(module, tmp_path)
    if augment_in == "device":
        assert probe.keys == [{"images", "labels", "index"}]
    else:
        assert probe.keys == [{"views", "labels", "index"}]
        assert probe.shapes == [[(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2]
    assert dm.train_batch_transform is None  # handed back after fit


def test_augment_in_checks(tmp_path):
    with pytest.raises(ValueError, match="module.augment_in"):
        DINOModule(backbone={"name": "test_resnet"}, augment_in="workers")
    module = small_dino(augment_in="loader")
    dm = tiny_datamodule(tmp_path)
    dm.setup()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, logger=False, accelerator="cpu")
    with pytest.raises(ValueError, match="augment_in=loader needs a data module"):
        trainer.fit(module, train_dataloaders=dm.train_dataloader())


def test_clip_grad_per_parameter_matches_the_loop():
    """The fused clip gives exactly the per-parameter loop of the official code."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(3, 4), (5,), (2, 2, 2), (7,)]]
    grads = [torch.randn(p.shape, generator=g) * s for p, s in zip(params, [5.0, 0.01, 2.0, 1.0])]
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    params.append(torch.nn.Parameter(torch.zeros(2)))  # no grad: skipped
    clip_grad_per_parameter_(params, 1.5)
    for p, gr in zip(params, grads):
        expected = gr * (1.5 / (gr.norm() + 1e-6)).clamp(max=1.0)
        assert torch.equal(p.grad, expected)
    assert params[-1].grad is None
    assert params[1].grad.norm() < 1.5 and abs(params[0].grad.norm() - 1.5) < 1e-5


def test_logged_rows_keep_every_training_value(tmp_path):
    """Schedules are logged only on the steps the loggers write; every written row still
    holds the loss and all four schedule values, at the step's schedule position."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    module = small_dino()
    trainer = cpu_trainer(
        max_epochs=2,
        limit_train_batches=3,
        log_every_n_steps=2,
        logger=CSVLogger(tmp_path / "csv", name="run"),
    )
    trainer.fit(module, datamodule=tiny_datamodule(tmp_path))
    with open(next((tmp_path / "csv").rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]  # steps 2, 4, 6 (log_every_n_steps=2)
    for r in rows:
        step = int(r["step"])
        for key in ("lr", "wd", "momentum"):
            expected = float(module._schedules[key][step])
            assert abs(float(r[f"train/{key}"]) - expected) <= 1e-6 * max(1.0, abs(expected))
        assert float(r["train/teacher_temp"]) > 0
