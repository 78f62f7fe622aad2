"""Lightning's MLFlowLogger with readable metric names and the run's models as run folders.

MLflow accepts only letters, digits and `_ / . - space` in a metric name, and Lightning's
logger silently drops the rest, so `val/knn_top1@20` would become `val/knn_top120`. Here `@`
becomes `_at_` (`val/knn_top1_at_20`) before Lightning sees the name.

With `log_model=true` Lightning would tag whichever checkpoint its callback saved last as
`best` (here the `last.ckpt` of the unmonitored callback) and log no config. Instead the
monitored callback's best checkpoint goes to `model/best/` and the latest state to
`model/latest/`, each beside the run's `.hydra/config.yaml` and `config_resolved.yaml`, so a
downloaded folder is a run directory that `load_run` opens.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import MLFlowLogger as _MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from shared.tracking.loggers import persistent_id

log = logging.getLogger(__name__)

RUN_FILES = (".hydra/config.yaml", ".hydra/overrides.yaml", "config_resolved.yaml")


def mlflow_key(name: str) -> str:
    return name.replace("@", "_at_")


class MLFlowLogger(_MLFlowLogger):
    """`run_id_file`: where the MLflow run id is kept, so a restarted or requeued run logs
    into the same MLflow run (ignored when `run_id` is given)."""

    def __init__(self, *args, run_id_file: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._run_id_file = Path(run_id_file) if run_id_file else None
        if self._run_id is None and self._run_id_file and self._run_id_file.is_file():
            self._run_id = self._run_id_file.read_text().strip()
        self._savers: dict[str, object] = {}  # alias -> the ModelCheckpoint that saves it
        self._logged: set[tuple[str, str, int]] = set()

    @property
    @rank_zero_experiment
    def experiment(self):
        # mlflow.set_tracking_uri (called by Lightning's logger) also exports
        # MLFLOW_TRACKING_URI, which the next run of a sweep in this process would then take
        # as its store (conf/logger/mlflow.yaml reads it): keep the environment as it was.
        before = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            client = _MLFlowLogger.experiment.fget(self)
        finally:
            if before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = before
        if self._run_id_file is not None and not self._run_id_file.is_file():
            persistent_id(self._run_id_file, lambda: self._run_id)
        return client

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        if self._log_model:  # the monitored callback keeps the best; the other, the latest
            self._savers["best" if checkpoint_callback.monitor else "latest"] = checkpoint_callback

    def finalize(self, status: str = "success") -> None:
        if self._initialized and status == "success":
            self._log_models()
        super().finalize(status)

    @rank_zero_only
    def _log_models(self) -> None:
        for alias, saver in self._savers.items():
            path = Path(saver.best_model_path or "")  # unmonitored: the latest save
            if not path.is_file():
                continue
            stamp = (alias, str(path), path.stat().st_mtime_ns)
            if stamp in self._logged:  # finalize runs after fit and again after test
                continue
            run_dir, where = path.parents[1], f"model/{alias}"
            self.experiment.log_artifact(self.run_id, str(path), f"{where}/checkpoints")
            for name in RUN_FILES:
                if (run_dir / name).is_file():
                    folder = str(Path(where, name).parent)
                    self.experiment.log_artifact(self.run_id, str(run_dir / name), folder)
            self._logged.add(stamp)

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        """MLflow refuses to change a logged parameter, so a run resumed with new values
        (e.g. more epochs) logs those as tags `resumed_with/<key>` and keeps the first."""
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

        params = {k: str(v)[:250] for k, v in _flatten_dict(_convert_params(params)).items()}
        logged = self.experiment.get_run(self.run_id).data.params
        changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
        for key, value in changed.items():
            self.experiment.set_tag(self.run_id, f"resumed_with/{key}", value)
        if changed:
            log.warning("MLflow run %s resumed with new values of %s", self.run_id, sorted(changed))
        fresh = {k: v for k, v in params.items() if k not in logged}
        if fresh:
            super().log_hyperparams(fresh)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({mlflow_key(k): v for k, v in metrics.items()}, step)
