"""Match new postings with a trained run: CSV of postings in, `matches.csv` out."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from shared.atomic import atomic_write
from shared.data.sources import DEFAULT_BACKGROUND, CsvSource, check_background
from shared.data.store import build_store
from shared.retrieval.search import knn_search
from shared.retrieval.threshold import matches_from_threshold
from shared.run_loading import load_run

log = logging.getLogger(__name__)


def run_threshold(run) -> float | None:
    """The threshold the run chose on validation, stored in its checkpoint by name."""
    value = run.chosen.get("threshold")
    if value is None:  # checkpoints written before the named entry: the callback's state
        for key, state in run.callbacks_state.items():
            if key.startswith("MatchingEvalCallback") and state.get("threshold") is not None:
                value = state["threshold"]
    return None if value is None else float(value)


def run_background(config) -> tuple[int, int, int]:
    """The colour the run's images were composited on (`data.source.background`; older runs:
    `data.background`), so new images decode as its training images did; white for runs
    made before the key existed."""
    for key in ("data.source.background", "data.background"):
        value = OmegaConf.select(config, key, default=None)
        if value is not None:
            return check_background(value, key)
    return DEFAULT_BACKGROUND


@torch.no_grad()
def embed_store(module, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="Embedding postings"):
        out.append(module.embed(torch.as_tensor(images[start : start + batch_size])).cpu())
    return torch.cat(out).numpy()


def write_matches(path: str | Path, ids: list[str], matches: list[list[str]]) -> Path:
    """`posting_id,matches` with space-separated ids, written atomically."""
    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["posting_id", "matches"])
        for pid, row in zip(ids, matches, strict=True):
            writer.writerow([pid, " ".join(map(str, row))])
    return Path(path)


def read_matches(path: str | Path) -> dict[str, list[str]]:
    with open(path, newline="") as f:
        return {r["posting_id"]: r["matches"].split() for r in csv.DictReader(f)}


def match_postings(
    run_dir: str | Path,
    csv_path: str | Path,
    out: str | Path,
    image_dir: str | Path | None = None,
    threshold: float | None = None,
    min2: float | None = None,
    k: int = 51,
    store_root: str | Path | None = None,
    which: str = "best",
) -> Path:
    run = load_run(run_dir, which)
    if threshold is None:
        threshold = run_threshold(run)
        if threshold is None:
            raise ValueError(f"{run.checkpoint} stores no threshold: pass one explicitly")
    source = CsvSource(
        str(csv_path),
        str(image_dir) if image_dir else None,
        label_col=None,
        id_col="posting_id",
        background=run_background(run.config),
    )
    size = int(run.config.data.image_size)
    root = Path(store_root) if store_root else Path(run.run_dir) / "inference_stores"
    store = build_store(source, root, size, name="postings")
    embeddings = embed_store(run.module, store.images)
    sims, idx = knn_search(embeddings, embeddings, k)
    matches = matches_from_threshold(sims, idx, store.ids, threshold, min2=min2)
    log.info("Matched %d postings at threshold %.3f", len(store.ids), threshold)
    return write_matches(out, store.ids, matches)
