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

from collections.abc import Mapping
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger as _MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

RUN_FILES = (".hydra/config.yaml", ".hydra/overrides.yaml", "config_resolved.yaml")


def mlflow_key(name: str) -> str:
    return name.replace("@", "_at_")


class MLFlowLogger(_MLFlowLogger):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._savers: dict[str, object] = {}  # alias -> the ModelCheckpoint that saves it
        self._logged: set[tuple[str, str, int]] = set()

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
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({mlflow_key(k): v for k, v in metrics.items()}, step)
