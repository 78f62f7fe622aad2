"""The run's title combination as the service applies it.

A run trained with `callbacks.matching_eval.text` stores its mode, the thresholds chosen on
validation and its title embedder (`matching.infer.run_text`: the fitted TF-IDF or a local
encoder). A query that comes with a
title is matched by that rule: candidates, similarities and scores from
`shared.retrieval.combine` (the evaluation's and infer.py's functions), the threshold rule
of `select_matches`. A query without a title, or a gallery without any, is matched by image
alone at the image threshold, as infer.py does for postings without titles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from omegaconf import OmegaConf

from matching.service.gallery import Gallery, Posting, select_matches
from shared.retrieval.combine import TextCombination, ranked
from shared.retrieval.text import TitleEmbedder


@dataclass(frozen=True)
class TitleRule:
    """Plain values of the combination (the title embedder lives in the gallery)."""

    mode: str  # union | sum | concat (`shared.retrieval.combine`)
    weight: float  # the image's share of the score in sum / concat
    threshold: float  # on the mode's score (union: on the image sim)
    text_threshold: float | None  # union: a title sim at or above it matches on its own
    k: int  # candidates per neighbour list: the evaluation's callbacks.matching_eval.k

    @property
    def combination(self) -> TextCombination:
        return TextCombination(self.mode, self.weight)


@dataclass(frozen=True)
class TitleHit:
    posting: Posting
    similarity: float  # image cosine
    title_similarity: float | None  # title cosine; None where either side has no title


def run_titles(run, threshold: float | None = None) -> tuple[TitleRule, TitleEmbedder] | None:
    """The rule and title embedder of `run` (None: it was trained on images only). An
    explicit `threshold` replaces the combination's, as infer.py's --threshold does."""
    from matching.infer import run_text

    text = run_text(run)
    if text is None:
        return None
    k = OmegaConf.select(run.config, "callbacks.matching_eval.k", default=None)
    if k is None:
        raise ValueError(f"{run.run_dir}: the run's config has no callbacks.matching_eval.k")
    tt = text["text_threshold"]
    rule = TitleRule(
        mode=str(text["mode"]),
        weight=float(text["weight"]),
        threshold=float(text["threshold"] if threshold is None else threshold),
        text_threshold=None if tt is None else float(tt),
        k=int(k),
    )
    return rule, text["embedder"]


def title_matches(
    gallery: Gallery, rule: TitleRule, queries: np.ndarray, titles: list[str], min2
) -> list[list[TitleHit]]:
    """Each query's matches under `rule`, best first by the rule's score."""
    combo = rule.combination
    pairs, postings = gallery.title_pairs(queries, titles, combo, rule.k)
    scores, pairs = ranked(pairs, combo, rule.text_threshold)
    out = []
    for r in range(len(scores)):
        n = int(np.count_nonzero(pairs.idx[r] >= 0))  # ranked: the candidates come first
        chosen = select_matches(scores[r, :n], rule.threshold, min2)
        out.append(
            [
                TitleHit(
                    postings[pairs.idx[r, j]],
                    float(pairs.image[r, j]),
                    float(pairs.text[r, j]) if np.isfinite(pairs.text[r, j]) else None,
                )
                for j in chosen
            ]
        )
    return out
