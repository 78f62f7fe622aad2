"""Each logger config runs a short fit and writes its files; any combination composes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.tracking.runs import TINY_DINO, run_in_process


def fit(compose_cfg, tiny_data, logger: str, *extra: str):
    cfg = compose_cfg("ssl", TINY_DINO + [f"logger={logger}", *extra], data_dir=tiny_data)
    metric = run_in_process(cfg)
    assert metric is not None
    return Path(cfg.paths.output_dir)


def check_csv(run):
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    assert any(r.get("val/knn_top1@10") for r in rows)
    hparams = yaml.safe_load((run / "csv" / "hparams.yaml").read_text())
    assert hparams["params/total"] > 0 and hparams["flops/per_image"] > 0  # the run summary


def check_tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    tags = set()
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert "val/knn_top1@10" in tags


def check_mlflow(run):
    from mlflow.tracking import MlflowClient

    db = run / "mlflow.db"
    assert db.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (experiment,) = client.search_experiments(filter_string="name = 'reprmatch-ssl'")
    (found,) = client.search_runs([experiment.experiment_id])
    assert "val/knn_top1_at_10" in found.data.metrics  # `@` written `_at_`, not dropped
    assert float(found.data.params["flops/per_image"]) > 0
    params = found.data.params  # the full resolved config, as the run used it
    assert params["seed"] == "0" and params["data.batch_size"] == "8"
    assert params["trainer.max_epochs"] == "1" and params["data.source.num_families"] == "6"


def check_wandb(run):
    from shared.tracking.wandb_offline import summarize

    info = summarize(run)
    assert "val/knn_top1@10" in info["history_keys"]


CHECKS = {
    "csv": check_csv,
    "tensorboard": check_tensorboard,
    "mlflow": check_mlflow,
    "wandb": check_wandb,
}


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "mlflow", "wandb"])
def test_logger_writes_its_files(compose_cfg, tiny_data, wandb_offline, logger):
    CHECKS[logger](fit(compose_cfg, tiny_data, logger))


def test_logger_list_and_many_compose(compose_cfg):
    assert list(compose_cfg("ssl", ["logger=[csv,tensorboard]"]).logger) == ["csv", "tensorboard"]
    assert list(compose_cfg("matching", ["logger=many"]).logger) == [
        "csv",
        "tensorboard",
        "wandb",
        "mlflow",
    ]
    cfg = compose_cfg("ssl", ["logger=wandb"])
    assert cfg.logger.wandb.offline is True  # offline unless wandb_online=true
    assert compose_cfg("ssl", ["logger=wandb", "wandb_online=true"]).logger.wandb.offline is False


@pytest.mark.slow
def test_every_logger_at_once(compose_cfg, tiny_data, wandb_offline):
    run = fit(compose_cfg, tiny_data, "many")
    for check in CHECKS.values():
        check(run)


def test_mlflow_models_are_the_best_and_the_latest_with_their_config(
    compose_cfg, tiny_data, tmp_path, monkeypatch
):
    """log_model=true: `model/best` holds the monitored best checkpoint and `model/latest`
    the last state, each with the run's config; MLFLOW_TRACKING_URI chooses the store."""
    import torch
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'shared_mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    extra = ["logger.mlflow.log_model=true", "trainer.max_epochs=3", "test=true"]
    run = fit(compose_cfg, tiny_data, "mlflow", *extra)
    assert not (run / "mlflow.db").exists()  # the environment's store, not the default
    client = MlflowClient(tracking_uri=uri)
    (experiment,) = client.search_experiments(filter_string="name = 'reprmatch-ssl'")
    (found,) = client.search_runs([experiment.experiment_id])

    results = json.loads((run / "results.json").read_text())
    best_name = Path(results["best_checkpoint"]).name
    for alias, name in (("best", best_name), ("latest", "last.ckpt")):
        files = {a.path for a in client.list_artifacts(found.info.run_id, f"model/{alias}")}
        assert f"model/{alias}/checkpoints" in files and f"model/{alias}/.hydra" in files
        assert f"model/{alias}/config_resolved.yaml" in files
        local = Path(client.download_artifacts(found.info.run_id, f"model/{alias}", tmp_path))
        ckpt = local / "checkpoints" / name
        assert ckpt.read_bytes() == (run / "checkpoints" / name).read_bytes()
        assert torch.load(ckpt, weights_only=True)["epoch"] >= 0


@pytest.mark.slow
def test_a_resumed_run_continues_its_mlflow_and_wandb_runs(compose_cfg, tiny_data, wandb_offline):
    """A restart on the same run directory (what a requeue does) resumes from last.ckpt and
    logs into the same MLflow run and the same W&B run id."""
    from mlflow.tracking import MlflowClient

    first = fit(compose_cfg, tiny_data, "[mlflow,wandb]", "trainer.max_epochs=1")
    again = fit(compose_cfg, tiny_data, "[mlflow,wandb]", "trainer.max_epochs=2")
    assert again == first  # compose_cfg gives one output_dir per test: the same run directory

    client = MlflowClient(tracking_uri=f"sqlite:///{first / 'mlflow.db'}")
    (experiment,) = client.search_experiments(filter_string="name = 'reprmatch-ssl'")
    (found,) = client.search_runs([experiment.experiment_id])  # one run, not two
    assert (first / "mlflow_run_id").read_text() == found.info.run_id
    assert found.data.params["trainer.max_epochs"] == "1"  # MLflow keeps a param's first value
    assert found.data.tags["resumed_with/trainer.max_epochs"] == "2"
    steps = {m.step for m in client.get_metric_history(found.info.run_id, "val/knn_top1_at_10")}
    assert len(steps) == 2  # epoch 1's validation (first start), epoch 2's (second start)

    run_id = (first / "wandb_run_id").read_text()
    offline = sorted((first / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline)


def test_opening_an_mlflow_run_leaves_the_environment_alone(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; left set, the next job of a sweep
    in the same process would log into this run's store."""
    import os

    from shared.tracking.mlflow_logger import MLFlowLogger

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logger = MLFlowLogger(experiment_name="e", tracking_uri=f"sqlite:///{tmp_path / 'a.db'}")
    assert logger.experiment is not None and logger.run_id
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    other = MLFlowLogger(experiment_name="e", tracking_uri=f"sqlite:///{tmp_path / 'b.db'}")
    assert other.experiment is not None
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db"
