"""Keeps `metrics.csv` of the resume-safe `CSVLogger` in step with the checkpoints.

Each checkpoint records how many rows the file held when it was written; a resumed run cuts
the file back to that count before it appends (see `shared.tracking.csv_logger`).
"""

from __future__ import annotations

from lightning.pytorch import Callback

from shared.tracking.csv_logger import CSVLogger, KeepingWriter


class CsvHistory(Callback):
    """Saves the row count of each `CSVLogger` above with every checkpoint; on resume, cuts
    `metrics.csv` back to it before training continues."""

    def __init__(self) -> None:
        self._trainer = None
        self._restored: list[int] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def _writers(self) -> list[KeepingWriter]:
        trainer = self._trainer
        if trainer is None or not trainer.is_global_zero:
            return []
        return [lg.experiment for lg in trainer.loggers if isinstance(lg, CSVLogger)]

    def state_dict(self) -> dict:
        counts = []
        for writer in self._writers():
            writer.save()  # what was logged up to this checkpoint, on disk first
            counts.append(writer.rows_on_disk())
        return {"rows": counts}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = list(state_dict.get("rows", []))

    def on_train_start(self, trainer, pl_module) -> None:
        if self._restored is None:
            return
        for writer, count in zip(self._writers(), self._restored):
            writer.metrics = []
            writer.keep_rows(count)
        self._restored = None
