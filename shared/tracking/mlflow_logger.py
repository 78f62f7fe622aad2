"""Lightning's MLFlowLogger with readable metric names.

MLflow accepts only letters, digits and `_ / . - space` in a metric name, and Lightning's
logger silently drops the rest, so `val/knn_top1@20` would become `val/knn_top120`. Here `@`
becomes `_at_` (`val/knn_top1_at_20`) before Lightning sees the name.
"""

from __future__ import annotations

from collections.abc import Mapping

from lightning.pytorch.loggers import MLFlowLogger as _MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only


def mlflow_key(name: str) -> str:
    return name.replace("@", "_at_")


class MLFlowLogger(_MLFlowLogger):
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({mlflow_key(k): v for k, v in metrics.items()}, step)
