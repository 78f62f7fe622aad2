"""Small PNG plots written into the run directory (for users without a tracker)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared.atomic import atomic_write

if TYPE_CHECKING:
    from shared.retrieval.threshold import SweepResult


def curve_figure(rows: list[dict], x: str, keys: list[str], ylabel: str = ""):
    """A line per metric in `keys` against `x`, one marker per evaluation."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        ax.plot([r[x] for r in rows], [r[key] for r in rows], marker="o", label=key)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_curves(
    rows: list[dict], x: str, keys: list[str], path: str | Path, ylabel: str = ""
) -> Path:
    """`curve_figure` written to `path` atomically (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig = curve_figure(rows, x, keys, ylabel)
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, dpi=100, format="png")
    plt.close(fig)
    return path


def plot_threshold_sweep(result: SweepResult, path: str | Path) -> Path:
    """Save F1, precision and recall against threshold as a PNG, the best F1 marked.

    Uses a bare Agg figure (no pyplot state, safe in workers) and writes a temporary file in
    the target folder that is renamed into place, so a reader never sees half a PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    order = np.argsort(result.thresholds, kind="stable")
    t = result.thresholds[order]
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(t, result.f1[order], label="F1", linewidth=2)
    ax.plot(t, result.precision[order], label="precision", linestyle="--")
    ax.plot(t, result.recall[order], label="recall", linestyle=":")
    ax.plot(
        [result.best_threshold],
        [result.best_f1],
        marker="o",
        color="black",
        label=f"best F1 {result.best_f1:.4f} @ {result.best_threshold:.3f}",
    )
    ax.axvline(result.best_threshold, color="grey", linewidth=0.8)
    ax.set_xlabel("similarity threshold")
    ax.set_ylabel("mean over postings")
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()

    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png")
    return path
