"""Small PNG plots written into the run directory (for users without a tracker)."""

from __future__ import annotations

from pathlib import Path

from shared.atomic import atomic_write


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
