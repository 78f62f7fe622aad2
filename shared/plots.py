"""Small PNG plots written into the run directory (for users without a tracker)."""

from __future__ import annotations

import os
from pathlib import Path


def plot_curves(
    rows: list[dict], x: str, keys: list[str], path: str | Path, ylabel: str = ""
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        ax.plot([r[x] for r in rows], [r[key] for r in rows], marker="o", label=key)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
