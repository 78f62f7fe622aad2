"""trainer=ddp_cpu (2 gloo ranks, ddp_fork) against one process, with the real callbacks.

The evaluators gather embeddings by dataset index and drop what the distributed sampler pads,
so both ranks compute exactly the single-process kNN top-1 / F1 / threshold; Lightning logs
them once; rank 0 alone writes checkpoints; DDP keeps the ArcFace head identical on all ranks.
"""

import csv
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from shared.instantiate import instantiate, instantiate_group
from tests.pipelines import TINY

CONFIG = {"ssl": "ssl", "matching": "matching"}


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class RankMetrics(Callback):
    """Each rank saves what it logged, so rank 1's figures are compared too."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_validation_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        torch.save(metrics, os.path.join(self.out, f"metrics_rank{_rank()}.pt"))


class RankHead(Callback):
    """Each rank saves its ArcFace head weights after training."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        torch.save(
            pl_module.head.weight.detach().clone(), os.path.join(self.out, f"head_rank{_rank()}.pt")
        )


class RecordingIO(TorchCheckpointIO):
    """Notes the rank and path of every checkpoint written."""

    def __init__(self, log_file: str) -> None:
        self.log_file = log_file

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with open(self.log_file, "a") as f:
            f.write(f"{_rank()} {Path(path).name}\n")
        super().save_checkpoint(checkpoint, path, storage_options)


def build(compose_cfg, pipeline: str, *overrides: str):
    """Config, data module and module; the metric-learning net is built up front (not at
    setup) so both trainers see the very same weights."""
    cfg = compose_cfg(CONFIG[pipeline], [*TINY[pipeline], *overrides])
    kwargs = {}
    if pipeline == "matching":
        probe = instantiate(cfg.data, "data")
        kwargs["num_classes"] = probe.num_classes
    return cfg, instantiate(cfg.module, "module", **kwargs)


def val_rows(csv_dir: Path, key: str) -> list[dict]:
    with open(next(csv_dir.rglob("metrics.csv"))) as f:
        return [row for row in csv.DictReader(f) if row.get(key)]


@pytest.mark.parametrize("pipeline,key", [("ssl", "val/knn_top1@20"), ("matching", "val/f1")])
def test_validate_on_two_ranks_equals_one_process(compose_cfg, tmp_path, pipeline, key):
    cfg, module = build(compose_cfg, pipeline, "trainer=cpu")
    single = instantiate(
        cfg.trainer,
        "trainer",
        logger=False,
        enable_progress_bar=False,
        callbacks=instantiate_group(cfg.callbacks, "callbacks"),
    )
    expected = {
        k: float(v)
        for k, v in single.validate(module, datamodule=instantiate(cfg.data, "data"))[0].items()
    }

    ddp_cfg = compose_cfg(CONFIG[pipeline], [*TINY[pipeline], "trainer=ddp_cpu"])
    ddp = instantiate(
        ddp_cfg.trainer,
        "trainer",
        enable_progress_bar=False,
        logger=CSVLogger(tmp_path / "csv", name="ddp"),
        callbacks=[*instantiate_group(ddp_cfg.callbacks, "callbacks"), RankMetrics(str(tmp_path))],
    )
    assert ddp.world_size == 2 and ddp_cfg.trainer.strategy == "ddp_fork"
    got = {
        k: float(v)
        for k, v in ddp.validate(module, datamodule=instantiate(ddp_cfg.data, "data"))[0].items()
    }

    assert key in expected
    if pipeline == "matching":
        assert {"val/f1", "val/threshold"} <= set(expected)
    assert got == expected  # exactly: padding removed, rows in index order
    for rank in (0, 1):
        per_rank = torch.load(tmp_path / f"metrics_rank{rank}.pt")
        assert per_rank == {k: v for k, v in expected.items()}
    assert len(val_rows(tmp_path / "csv", key)) == 1  # logged once, not once per rank


def test_fit_on_two_ranks_syncs_the_arcface_head_and_rank0_writes(compose_cfg, tmp_path):
    cfg, module = build(
        compose_cfg,
        "matching",
        "trainer=ddp_cpu",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=1",
        "trainer.check_val_every_n_epoch=1",
    )
    initial = module.head.weight.detach().clone()
    saves = tmp_path / "saves.log"
    trainer = instantiate(
        cfg.trainer,
        "trainer",
        enable_progress_bar=False,
        logger=CSVLogger(tmp_path / "csv", name="fit"),
        plugins=[RecordingIO(str(saves))],
        callbacks=[*instantiate_group(cfg.callbacks, "callbacks"), RankHead(str(tmp_path))],
    )
    trainer.fit(module, datamodule=instantiate(cfg.data, "data"))

    heads = [torch.load(tmp_path / f"head_rank{r}.pt") for r in (0, 1)]
    assert not torch.equal(heads[0], initial)  # one optimiser step happened
    assert torch.equal(heads[0], heads[1])  # from gradients averaged over both ranks' data
    written = saves.read_text().split("\n")[:-1]
    assert written and all(line.startswith("0 ") for line in written)  # rank 0 only
    checkpoints = sorted(p.name for p in (Path(cfg.paths.output_dir) / "checkpoints").iterdir())
    assert checkpoints == ["epoch_000.ckpt", "last.ckpt"]
    assert len(val_rows(tmp_path / "csv", "val/f1")) == 1
