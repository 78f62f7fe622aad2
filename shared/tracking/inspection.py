"""What the inspection notebooks compute, kept here so it is tested and the notebooks stay short.

run = load_run(find_run_dir(os.environ.get("RUN_DIR"), "ssl"))
data = split_embeddings(run)                       # bank (train) and query (val) splits
fig = show_examples(nearest_examples(data["query"], data["bank"]), run.datamodule.store)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from shared.config import REPO_ROOT
from shared.embedding import embed_rows

# ---- finding and embedding a run ----------------------------------------------------------


def find_run_dir(run_dir: str | os.PathLike | None, pipeline: str) -> Path:
    """`run_dir` when given, else the newest run under logs/<pipeline>/*/runs/."""
    if run_dir:
        path = Path(run_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"run directory {path} does not exist")
        return path
    from shared.run_loading import newest_run

    run = newest_run(REPO_ROOT / "logs" / pipeline, "*/runs/*")
    if run is None:
        raise FileNotFoundError(
            f"no run under {REPO_ROOT / 'logs' / pipeline}: set RUN_DIR "
            "(environment) or the RUN_DIR parameter to a run directory"
        )
    return run


def split_embeddings(run, batch_size: int = 256) -> dict[str, dict[str, np.ndarray]]:
    """{"bank": labelled train rows, "query": validation rows}, each {"index", "embeddings",
    "labels"} (the layout `EmbeddingCallback.gathered()` gives evaluators)."""
    dm = run.datamodule
    dm.setup()
    out = {}
    for name, rows in (("bank", dm.bank_indices), ("query", dm.val_indices)):
        rows = np.asarray(rows)
        out[name] = {
            "index": rows,
            "labels": dm.store.labels[torch.as_tensor(rows)].numpy(),
            "embeddings": embed_rows(run.module, dm.store.images, rows, batch_size),
        }
    return out


# ---- figures ------------------------------------------------------------------------------

GREEN, RED, ORANGE, GREY = "#2ca02c", "#d62728", "#ff7f0e", "#7f7f7f"


def tile_rows(rows: list[list[tuple]], images, tile: float = 1.5, title: str | None = None):
    """A figure of image rows; each tile is (store row, caption, frame colour or None)."""
    import matplotlib.pyplot as plt

    ncols = max((len(r) for r in rows), default=1)
    fig, axes = plt.subplots(
        len(rows), ncols, figsize=(tile * ncols, tile * 1.15 * len(rows)), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for i, row in enumerate(rows):
        for j, (store_row, caption, colour) in enumerate(row):
            ax = axes[i, j]
            ax.imshow(np.asarray(images[int(store_row)]).transpose(1, 2, 0))
            ax.set_title(caption, fontsize=7, color=colour or "black")
            if colour:
                ax.axis("on")
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def show_examples(examples, images, title: str | None = None):
    """Queries (first column) and their neighbours, framed green (same label) or red."""
    rows = []
    for ex in examples:
        row = [(ex.query, f"query {ex.label}", GREY)]
        row += [
            (n, f"{s:.3f}", GREEN if r else RED)
            for n, s, r in zip(ex.neighbours, ex.sims, ex.right)
        ]
        rows.append(row)
    return tile_rows(rows, images, title=title)


def plot_history(
    history: list[dict], x: str = "epoch", keys: list[str] | None = None, ylabel: str = ""
):
    """The metrics of a run's history (e.g. knn_history.json) against `x`, as a figure."""
    from shared.plots import curve_figure

    keys = keys or [k for k in (history[-1] if history else {}) if k not in ("epoch", "step")]
    return curve_figure(history, x, keys, ylabel)


def project_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """[N, D] -> [N, 2] by PCA or t-SNE (scikit-learn)."""
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(features)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(max(2, min(30, (len(features) - 1) // 3)))
        return TSNE(
            n_components=2, perplexity=perplexity, init="pca", random_state=seed
        ).fit_transform(features)
    raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")


# ---- DINO self-attention of a ViT ---------------------------------------------------------


def find_vit(module):
    """The timm VisionTransformer `embed` runs (DINO: the teacher), or None (e.g. a ResNet)."""
    for name in ("teacher_backbone", "backbone", "net"):
        part = getattr(module, name, None)
        if part is None:
            continue
        if name == "net":
            part = getattr(part, "backbone", None)
        model = getattr(part, "model", part)
        blocks = getattr(model, "blocks", None)
        if (
            blocks is not None
            and len(blocks)
            and hasattr(blocks[-1], "attn")
            and hasattr(blocks[-1].attn, "attn_drop")
            and hasattr(model, "patch_embed")
        ):
            return model
    return None


@torch.no_grad()
def last_block_attention(vit, x: torch.Tensor) -> torch.Tensor:
    """CLS-token attention of the last block, per head, on the patch grid: [B, heads, gh, gw].

    The map of Caron et al. (2021), Fig. 1: softmax(q_cls . k / sqrt(d)) over the patches.
    The fused kernel hides the weights, so the last block runs its explicit path once while
    a hook on its attention dropout (identity in eval mode) reads them.
    """
    attn = vit.blocks[-1].attn
    seen = {}
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.__setitem__("a", o))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        vit.forward_features(x)
    finally:
        attn.fused_attn = fused
        handle.remove()
    weights = seen["a"]  # [B, heads, N, N]
    cls = weights[:, :, 0, vit.num_prefix_tokens :]
    return cls.reshape(cls.shape[0], cls.shape[1], *_patch_grid(vit, x.shape[-2:], cls.shape[-1]))


def _patch_grid(vit, size, n_patches: int) -> tuple[int, int]:
    ph, pw = vit.patch_embed.patch_size
    grid = (size[0] // ph, size[1] // pw)
    if grid[0] * grid[1] != n_patches:  # padded or resized input: fall back to a square
        side = int(round(n_patches**0.5))
        grid = (side, n_patches // side)
    return grid


def show_attention(images, maps: torch.Tensor, tile: float = 1.5):
    """Each image (row) next to its per-head attention maps, upsampled to the image."""
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    b, heads = maps.shape[:2]
    size = images.shape[-2:]
    up = F.interpolate(maps.float(), size=size, mode="nearest")
    fig, axes = plt.subplots(b, heads + 1, figsize=(tile * (heads + 1), tile * b), squeeze=False)
    for i in range(b):
        axes[i, 0].imshow(np.asarray(images[i]).transpose(1, 2, 0))
        for h in range(heads):
            axes[i, h + 1].imshow(up[i, h].numpy(), cmap="inferno")
            if i == 0:
                axes[i, h + 1].set_title(f"head {h}", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    return fig


# ---- product matching --------------------------------------------------------------------


def match_fold(
    embeddings: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    k: int = 51,
    min2: float | None = None,
) -> dict:
    """Self-search of a fold, its matches at `threshold` (positions, itself first) with their
    similarities, and each row's F1 (the competition metric, row by row)."""
    from shared.retrieval.search import knn_search
    from shared.retrieval.threshold import matches_from_threshold

    labels = np.asarray(labels)
    sims, idx = knn_search(embeddings, embeddings, k)
    positions = np.arange(len(labels))
    matches = matches_from_threshold(sims, idx, positions, threshold, min2=min2)
    sim_of = [dict(zip(idx[i].tolist(), sims[i].tolist())) for i in range(len(labels))]
    group_size = {g: int(n) for g, n in zip(*np.unique(labels, return_counts=True))}
    f1 = np.empty(len(labels))
    for i, pred in enumerate(matches):
        tp = int(np.sum(labels[pred] == labels[i]))
        f1[i] = 2 * tp / (len(pred) + group_size[labels[i]])
    return {"sims": sims, "idx": idx, "matches": matches, "sim_of": sim_of, "f1": f1}


def worst_groups(labels: np.ndarray, f1: np.ndarray, n: int = 4) -> list:
    """Labels of the `n` groups with the lowest mean row F1."""
    labels = np.asarray(labels)
    groups = np.unique(labels)
    means = np.array([f1[labels == g].mean() for g in groups])
    return [groups[i].item() for i in np.argsort(means, kind="stable")[:n]]


def group_rows(group, labels, result: dict, store_rows, max_tiles: int = 10) -> list[list]:
    """Tiles for one group: its worst member as the query, the members it found (green), the
    ones it missed (orange), then its false matches (red), similarities as captions."""
    labels = np.asarray(labels)
    members = np.flatnonzero(labels == group)
    query = members[np.argmin(result["f1"][members])]
    pred = set(result["matches"][query])
    sims = result["sim_of"][query]
    row = [(store_rows[query], f"query F1 {result['f1'][query]:.2f}", GREY)]
    for m in members:
        if m != query:
            found = m in pred
            caption = (
                f"{sims[m]:.2f} found"
                if found
                else (f"{sims[m]:.2f} missed" if m in sims else "missed")
            )
            row.append((store_rows[m], caption, GREEN if found else ORANGE))
    false = [p for p in result["matches"][query] if labels[p] != group]
    row += [(store_rows[p], f"{sims.get(p, float('nan')):.2f} false", RED) for p in false]
    return [row[:max_tiles]]
