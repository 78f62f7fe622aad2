"""metrics.csv across a resume: kept, cut back to the rows its checkpoint had seen, appended."""

import csv

from shared.callbacks.csv_history import CsvHistory
from shared.tracking.csv_logger import CSVLogger


class FakeTrainer:
    is_global_zero = True

    def __init__(self, loggers):
        self.loggers = loggers


def rows(logger):
    with open(logger.experiment.metrics_file_path, newline="") as handle:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(handle)]


def test_a_resume_keeps_the_rows_before_its_checkpoint_and_drops_the_rest(tmp_path):
    first = CSVLogger(tmp_path, name="csv", version="")
    history = CsvHistory()
    history.setup(FakeTrainer([first]), None, "fit")
    for step in range(3):
        first.log_metrics({"loss": float(step)}, step=step)
    state = history.state_dict()  # a checkpoint after step 2: it flushes, then counts
    assert state == {"rows": [3]}
    for step in range(3, 5):  # logged (and flushed) after the checkpoint, then a kill
        first.log_metrics({"loss": float(step)}, step=step)
    first.save()
    assert len(rows(first)) == 5

    second = CSVLogger(tmp_path, name="csv", version="")  # the restarted process
    assert len(rows(second)) == 5  # Lightning's own logger would have deleted the file
    restored = CsvHistory()
    restored.setup(FakeTrainer([second]), None, "fit")
    restored.load_state_dict(state)
    restored.on_train_start(None, None)
    assert rows(second) == [(0, "0.0"), (1, "1.0"), (2, "2.0")]
    for step in range(3, 5):  # the redone steps, with a new column
        second.log_metrics({"loss": step + 0.5, "lr": 0.1}, step=step)
    second.save()
    assert rows(second) == [(0, "0.0"), (1, "1.0"), (2, "2.0"), (3, "3.5"), (4, "4.5")]
