"""The threshold-sweep plot: a whole PNG at the target path, nothing else left behind."""

import numpy as np

from shared.plots import plot_threshold_sweep
from shared.retrieval.threshold import SweepResult


def test_plot_writes_png_atomically(tmp_path):
    thresholds = np.linspace(0.1, 0.95, 18)
    precision, recall = thresholds, 1 - thresholds
    f1 = 2 * precision * recall / (precision + recall)
    result = SweepResult(thresholds, f1, precision, recall, int(np.argmax(f1)))
    path = plot_threshold_sweep(result, tmp_path / "plots" / "sweep.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["sweep.png"]
