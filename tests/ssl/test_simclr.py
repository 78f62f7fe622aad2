"""SimCLR: NT-Xent against a direct formula and lightly's NTXentLoss; the module trains on
that loss through the SSL base; `python ssl/run.py module=simclr` trains and evaluates."""

import csv
import json
import math

import lightning as L
import pytest
import torch
from lightly.loss import NTXentLoss

from selfsup.simclr import SimCLRModule, nt_xent_loss
from tests.pipelines import SHORT, TINY_SSL_DATA, run, run_dir
from tests.ssl.test_dino_module import cpu_trainer, tiny_datamodule


def direct_nt_xent(z: torch.Tensor, temperature: float) -> float:
    """Chen et al. 2020, eq. 1, pair by pair in float64: for anchor i with positive j,
    -log( exp(s_ij / t) / sum_{k != i} exp(s_ik / t) ), averaged over all 2B anchors."""
    z = z.double()
    n, b = z.shape[0], z.shape[0] // 2
    cos = [[float(z[i] @ z[k] / (z[i].norm() * z[k].norm())) for k in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        j = (i + b) % n
        denominator = sum(math.exp(cos[i][k] / temperature) for k in range(n) if k != i)
        total += -math.log(math.exp(cos[i][j] / temperature) / denominator)
    return total / n


@pytest.mark.parametrize("b,dim,temperature", [(1, 3, 0.5), (4, 8, 0.1), (7, 16, 0.2)])
def test_nt_xent_matches_direct_formula_and_lightly(b, dim, temperature):
    g = torch.Generator().manual_seed(b)
    z = torch.randn(2 * b, dim, generator=g) * 3
    ours = nt_xent_loss(z, temperature)
    assert ours.item() == pytest.approx(direct_nt_xent(z, temperature), rel=1e-5)
    lightly = NTXentLoss(temperature=temperature, memory_bank_size=0)(z[:b], z[b:])
    torch.testing.assert_close(ours, lightly, rtol=1e-5, atol=1e-6)


def test_nt_xent_refuses_an_odd_batch():
    with pytest.raises(ValueError, match="two views of each image, got 5 rows"):
        nt_xent_loss(torch.randn(5, 4))


class LossProbe(L.Callback):
    """The NT-Xent of the batch's views by the direct formula, before the step trains."""

    def __init__(self):
        self.expected, self.trained, self.lrs = [], [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        with torch.no_grad():  # train mode as in the step: BatchNorm on batch statistics
            z = module.projector(module.backbone(torch.cat(batch["views"])))
        self.expected.append(direct_nt_xent(z, module.hparams.temperature))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.trained.append(outputs["loss"].item())
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_simclr_trains_on_nt_xent_with_the_base_schedules(tmp_path):
    torch.manual_seed(0)
    module = SimCLRModule(
        backbone={"name": "test_resnet"},
        proj_hidden_dim=16,
        proj_output_dim=8,
        views={"size": 32},
        augment_in="loader",
        warmup_epochs=0,
    )
    probe = LossProbe()
    trainer = cpu_trainer(limit_train_batches=3, callbacks=[probe])
    trainer.fit(module, datamodule=tiny_datamodule(tmp_path))
    assert len(probe.trained) == 3
    assert probe.trained == pytest.approx(probe.expected, rel=1e-5)
    schedule = module._schedules
    assert set(schedule) == {"lr", "wd"}  # no teacher: no momentum schedule, no EMA
    peak = module.hparams.base_lr * 4 / 256  # batch 4, linear scaling
    assert schedule["lr"][0] == pytest.approx(peak)
    assert [lrs[0] for lrs in probe.lrs] == pytest.approx(list(schedule["lr"]))
    emb = module.embed(torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8))
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))


@pytest.mark.slow
def test_simclr_command_line_trains_and_evaluates(tmp_path):
    """`python ssl/run.py module=simclr`: the same callbacks evaluate it (kNN on validation
    and test), its checkpoint names its class, its logs hold the base's schedules."""
    import sys

    from tests.conftest import REPO

    cmd = [
        sys.executable,
        str(REPO / "ssl/run.py"),
        "module=simclr",
        *TINY_SSL_DATA,
        *SHORT,
        "module.views.size=32",
        "module.proj_hidden_dim=64",
        "module.proj_output_dim=32",
        "trainer.log_every_n_steps=1",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    out = run(cmd)
    assert out.returncode == 0, out.stderr[-3000:]
    folder = run_dir("ssl", tmp_path, "simclr")
    results = json.loads((folder / "results.json").read_text())
    assert 0 <= results["test"]["test/knn_top1@20"] <= 1
    assert 0 <= results["untrained_test"]["test/knn_top1@20"] <= 1
    ckpt = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["module_class"] == "selfsup.simclr.SimCLRModule"
    with open(next(folder.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    trained = [r for r in rows if r.get("train/loss")]
    assert trained and all(math.isfinite(float(r["train/loss"])) for r in trained)
    assert any(r.get("train/lr") for r in trained) and "train/momentum" not in rows[0]
    assert any(r.get("val/knn_top1@20") for r in rows)
