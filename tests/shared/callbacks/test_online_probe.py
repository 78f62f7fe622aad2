"""The online probe learns from detached features and leaves the network's training alone."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from shared.callbacks.online_probe import OnlineProbeCallback
from shared.instantiate import instantiate, instantiate_group
from tests.pipelines import TINY

FIT = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "trainer.check_val_every_n_epoch=1",
]


def fit(compose_cfg, callbacks: str):
    """A seeded tiny DINO fit (test ResNet: batch norm) with the given callbacks group."""
    cfg = compose_cfg("ssl", [*TINY["ssl"], *FIT, f"callbacks={callbacks}"])
    L.seed_everything(0)
    dm, module = instantiate(cfg.data, "data"), instantiate(cfg.module, "module")
    group = [c for c in instantiate_group(cfg.callbacks, "callbacks") if hasattr(c, "evaluate")]
    trainer = instantiate(
        cfg.trainer,
        "trainer",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=group,
    )
    trainer.fit(module, datamodule=dm)
    return trainer, module, dm, group


@pytest.mark.slow
def test_probe_learns_and_never_changes_the_network(compose_cfg):
    trainer, module, dm, group = fit(compose_cfg, "[knn,online_probe]")
    probe = next(c for c in group if isinstance(c, OnlineProbeCallback))
    _, plain, _, _ = fit(compose_cfg, "[knn]")

    # every weight and buffer (batch-norm statistics included) as without the probe
    with_probe, without = module.state_dict(), plain.state_dict()
    assert with_probe.keys() == without.keys()
    for name, value in with_probe.items():
        assert torch.equal(value, without[name]), name

    metrics = trainer.callback_metrics
    assert {"train/probe_acc", "train/probe_loss", "val/probe_top1"} <= set(metrics)
    start = torch.empty_like(probe.head.weight)
    torch.nn.init.normal_(start, std=0.01, generator=torch.Generator().manual_seed(probe.seed))
    assert not torch.equal(probe.head.weight, start)  # the head was trained
    # val/probe_top1 is the head's top-1 on the embedded val queries, recomputed here
    dm.setup()
    module.eval()
    with torch.no_grad():
        batches = list(dm.query_dataloader("val"))
        x = torch.cat([module.embed(b["images"]) for b in batches])
        y = torch.cat([b["labels"] for b in batches])
        expect = (probe.head(x).argmax(1) == y).float().mean()
    assert float(metrics["val/probe_top1"]) == pytest.approx(float(expect), abs=1e-6)


def test_the_callbacks_override_composes(compose_cfg):
    cfg = compose_cfg("ssl", ["callbacks=[ssl,online_probe]"])
    callbacks = instantiate_group(cfg.callbacks, "callbacks")
    probe = [c for c in callbacks if isinstance(c, OnlineProbeCallback)]
    assert len(probe) == 1 and probe[0].loader == "query" and probe[0].seed == cfg.seed
    assert "online_probe" not in compose_cfg("ssl", []).callbacks  # off by default


def test_a_loader_the_data_module_lacks_is_refused(compose_cfg):
    class Trainer:
        class datamodule:
            VAL_LOADERS = ("fold",)

    with pytest.raises(ValueError, match="loaders are \\('fold',\\)"):
        OnlineProbeCallback().setup(Trainer(), None, "fit")
