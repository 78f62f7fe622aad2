"""Match new postings with a trained run: CSV of postings in, `matches.csv` out."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from omegaconf import OmegaConf

from shared.atomic import atomic_write
from shared.callbacks.matching_eval import EMBEDDER_KEY, LEGACY_KEY
from shared.data.sources import DEFAULT_BACKGROUND, CsvSource, check_background
from shared.data.store import build_store
from shared.embedding import embed_rows
from shared.retrieval.combine import TextCombination, candidate_pairs, combined_matches
from shared.retrieval.search import knn_search
from shared.retrieval.text import embedder_from_state, has_title, titles_by_id
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
    explicit = threshold is not None
    if threshold is None:
        threshold = run_threshold(run)
        if threshold is None:
            raise ValueError(f"{run.checkpoint} stores no threshold: pass one explicitly")
    # Before any embedding: a title encoder whose folder is gone or changed is refused here.
    text = run_text(run, next(run.module.parameters()).device)
    if text is not None and explicit:  # --threshold overrides the combination's threshold
        text = {**text, "threshold": threshold}
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
    embeddings = embed_rows(run.module, store.images, desc="Embedding postings")
    titles = titles_by_id(source, store.ids)
    matches = match_embeddings(embeddings, store.ids, threshold, min2, k, titles, text)
    log.info("Matched %d postings at threshold %.3f", len(store.ids), threshold)
    return write_matches(out, store.ids, matches)


def run_text(run, device="cpu") -> dict | None:
    """The run's title combination (`callbacks.matching_eval.text`) with its chosen
    thresholds and its title embedder (`embedder`: the fitted TF-IDF, or the encoder loaded
    on `device` once its folder is checked); None for an image-only run."""
    text = run.chosen.get("text")
    if text is None:
        return None
    for key, state in run.callbacks_state.items():
        if key.startswith("MatchingEvalCallback"):
            embedder = state.get(EMBEDDER_KEY, state.get(LEGACY_KEY))
            if embedder is not None:
                return {**text, "embedder": embedder_from_state(embedder, device)}
    raise ValueError(f"{run.checkpoint} chose a title combination but holds no title embedder")


def match_embeddings(
    embeddings, ids, threshold, min2=None, k=51, titles=None, text=None
) -> list[list]:
    """Each posting's matches: image only, or with `text` (see `run_text`) the run's title
    combination, as the evaluation scores it. Postings without a title fall back to the image
    (no title at all: image only, at the image threshold)."""
    sims, idx = knn_search(embeddings, embeddings, k)
    if text is None or titles is None or not has_title(titles).any():
        return matches_from_threshold(sims, idx, ids, threshold, min2=min2)
    combo = TextCombination(text["mode"], text["weight"], tuple(text["text_thresholds"]))
    vectors = text["embedder"].transform(titles)
    pairs = candidate_pairs(combo, embeddings, vectors, has_title(titles), k, (sims, idx))
    return combined_matches(pairs, ids, combo, text["threshold"], text["text_threshold"], min2)
