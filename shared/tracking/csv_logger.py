"""Lightning's CSV logger, made to survive a resume: `metrics.csv` keeps its history.

Lightning's writer deletes an existing `metrics.csv` when it starts, so a run resumed after a
kill or a SLURM requeue lost every row before the resume point. Here the file is kept, and
the `shared.callbacks.csv_history.CsvHistory` callback (which `shared.train.run` always adds)
records in each checkpoint how many rows the file held when the checkpoint was written. A
resumed run first cuts the file back to that count (the rows logged after the checkpoint are
about work that is now redone), then appends: no row is lost, none is written twice.
"""

from __future__ import annotations

import csv
import os

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from shared.atomic import atomic_write


class KeepingWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as handle:
                self.metrics_keys = list(csv.DictReader(handle).fieldnames or [])

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes metrics.csv here; the history is kept instead."""

    def rows_on_disk(self) -> int:
        if not os.path.isfile(self.metrics_file_path):
            return 0
        with open(self.metrics_file_path, newline="") as handle:
            return sum(1 for _ in csv.DictReader(handle))

    def keep_rows(self, count: int) -> None:
        """Cut `metrics.csv` back to its first `count` rows (atomically)."""
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if len(rows) > count:
            self._write(self.metrics_keys, rows[:count])

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        self._write(fieldnames, rows)

    def _write(self, fieldnames: list[str], rows: list[dict]) -> None:
        with atomic_write(self.metrics_file_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)


class CSVLogger(LightningCSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` whose `metrics.csv` outlives a resume."""

    @property
    @rank_zero_experiment
    def experiment(self) -> KeepingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = KeepingWriter(log_dir=self.log_dir)
        return self._experiment
