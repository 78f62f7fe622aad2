"""Image + title matching, the Shopee way: one candidate list per posting, one score rule.

Modes (`TextCombination.mode`):
  union   match if image sim >= t_image OR title sim >= t_text (candidates: both top-k lists);
  sum     match if w * image sim + (1 - w) * title sim >= t (candidates: both top-k lists);
  concat  the same weighted sum searched exactly: it is the inner product of the concatenated
          embeddings [sqrt(w) image, sqrt(1 - w) title], so its top-k are the true top-k.
A pair where either posting has no title falls back to the image: its title sim is ignored
(union) or its score is the image sim alone (sum, concat).

Every mode ends as (scores, idx) rows for `threshold_sweep` / `matches_from_threshold`, so
evaluation, inference and the service apply the one threshold rule. The searches match a set
against itself (evaluation, inference) or, with `queries` = (image, text, titled) of new
postings, those against a gallery (the service; `ranked` orders their rows for its rule).
Title vectors are unit rows, sparse (TF-IDF) or dense (an encoder, `shared.retrieval.text`):
`_title_sims` and `_pair_title_sims` are the only places that tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

from shared.retrieval.search import knn_search
from shared.retrieval.threshold import matches_from_threshold, threshold_sweep

MODES = ("union", "sum", "concat")
Vectors = sp.csr_matrix | np.ndarray  # title vectors: unit rows, sparse or dense
_CHUNK = 1024  # query rows per dense block of an exact search


@dataclass(frozen=True)
class TextCombination:
    """`callbacks.matching_eval.text`: how titles join the image (weight: the image's share
    in sum / concat; text_thresholds: the title-threshold grid union sweeps jointly)."""

    mode: str = "union"
    weight: float = 0.5
    text_thresholds: tuple[float, float, int] = (0.0, 1.0, 21)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"callbacks.matching_eval.text.mode={self.mode!r}: expected {MODES}")
        if not 0.0 <= float(self.weight) <= 1.0:
            raise ValueError(f"callbacks.matching_eval.text.weight={self.weight}: expected 0..1")
        if len(self.text_thresholds) != 3 or int(self.text_thresholds[2]) < 1:
            raise ValueError(
                f"callbacks.matching_eval.text.text_thresholds={self.text_thresholds}: "
                "expected [start, stop, num] with num >= 1"
            )

    @property
    def text_grid(self) -> np.ndarray:
        start, stop, num = self.text_thresholds
        return np.linspace(float(start), float(stop), int(num))


@dataclass(frozen=True)
class Pairs:
    """Each row's candidates (idx, -1 = none) with both exact similarities; `text` is -inf
    where either posting has no title."""

    idx: np.ndarray
    image: np.ndarray
    text: np.ndarray

    def scores(self, combo: TextCombination, text_threshold: float | None = None) -> np.ndarray:
        """What the threshold is compared with: for union, the image sim, or +inf where the
        title sim reaches `text_threshold`; otherwise the (weighted) sum."""
        if combo.mode == "union":
            return np.where(self.text >= text_threshold, np.inf, self.image)
        w = float(combo.weight)
        return np.where(np.isfinite(self.text), w * self.image + (1 - w) * self.text, self.image)


def _title_sims(q_text, text) -> np.ndarray:
    """Dense [Nq, N] title cosines of unit rows, sparse or dense."""
    sims = q_text @ text.T
    return sims.toarray() if sp.issparse(sims) else np.asarray(sims)


def _pair_title_sims(q_text, text, idx: np.ndarray) -> np.ndarray:
    """[Nq, k] title cosine of each query row with gallery rows `idx` (all >= 0)."""
    if not sp.issparse(q_text):
        return np.einsum("nd,nkd->nk", q_text, text[idx])
    rows = np.repeat(np.arange(len(idx)), idx.shape[1])
    return np.asarray(q_text[rows].multiply(text[idx.ravel()]).sum(axis=1)).reshape(idx.shape)


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    s = np.take_along_axis(scores, part, 1)
    order = np.argsort(-s, axis=1, kind="stable")
    return np.take_along_axis(s, order, 1).astype(np.float32), np.take_along_axis(part, order, 1)


def exact_knn(
    image: np.ndarray | None,
    text: Vectors | None,
    titled: np.ndarray,
    weight: float,
    k: int,
    queries: tuple | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of w * image sim + (1 - w) * title sim (image sim alone for a pair missing
    a title; title sim alone, -inf without titles, when `image` is None). Rows: `queries`
    (default: the gallery itself). [Nq, k] each."""
    q_image, q_text, q_titled = queries if queries is not None else (image, text, titled)
    n = len(q_titled)
    k = min(int(k), len(titled))
    sims, idx = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    for lo in range(0, n, _CHUNK):
        rows = slice(lo, lo + _CHUNK)
        both = q_titled[rows, None] & titled[None, :]
        t = _title_sims(q_text[rows], text) if text is not None else 0.0
        if image is None:
            s = np.where(both, t, -np.inf)
        else:
            im = q_image[rows] @ image.T
            s = np.where(both, weight * im + (1 - weight) * t, im) if text is not None else im
        sims[rows], idx[rows] = _top_k(s, k)
    return sims, idx


def title_knn(
    text: Vectors, titled: np.ndarray, k: int, queries: tuple | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by title sim alone (-inf for pairs missing a title)."""
    return exact_knn(None, text, titled, 0.0, k, queries)


def _merged(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Both candidate lists side by side, each index once per row (repeats become -1)."""
    idx = np.hstack([a, b])
    order = np.argsort(idx, axis=1, kind="stable")
    s = np.take_along_axis(idx, order, 1)
    repeat = np.zeros_like(s, dtype=bool)
    repeat[:, 1:] = s[:, 1:] == s[:, :-1]
    out = idx.copy()
    np.put_along_axis(out, order, np.where(repeat, -1, s), 1)
    return out


def pair_sims(
    idx: np.ndarray,
    image: np.ndarray,
    text: Vectors,
    titled: np.ndarray,
    queries: tuple | None = None,
) -> Pairs:
    """Exact image and title similarities of every (row, idx) pair; rows are `queries`
    (image, text, titled; default: the gallery itself)."""
    q_image, q_text, q_titled = queries if queries is not None else (image, text, titled)
    safe = np.maximum(idx, 0)
    img = np.einsum("nd,nkd->nk", q_image, image[safe]).astype(np.float32)
    txt = _pair_title_sims(q_text, text, safe).astype(np.float32)
    both = q_titled[:, None] & titled[safe]
    missing = idx < 0
    return Pairs(
        idx,
        np.where(missing, -np.inf, img).astype(np.float32),
        np.where(missing | ~both, -np.inf, txt).astype(np.float32),
    )


def candidate_pairs(
    combo: TextCombination,
    image: np.ndarray,
    text: Vectors,
    titled: np.ndarray,
    k: int,
    image_knn: tuple[np.ndarray, np.ndarray] | None = None,
    text_knn: tuple[np.ndarray, np.ndarray] | None = None,
    queries: tuple | None = None,
) -> Pairs:
    """The mode's candidates with both similarities. `image` rows unit-norm; `image_knn` /
    `text_knn`: searches already made (image: `knn_search`; title: `title_knn`); `queries`:
    (image, text, titled) of postings outside the gallery (default: the gallery itself)."""
    if combo.mode == "concat":
        _, idx = exact_knn(image, text, titled, float(combo.weight), k, queries)
    else:
        q_image = queries[0] if queries is not None else image
        _, img_idx = image_knn if image_knn is not None else knn_search(q_image, image, k)
        txt_sims, txt_idx = (
            text_knn if text_knn is not None else title_knn(text, titled, k, queries)
        )
        # Title neighbours at sim <= 0 are left out (for TF-IDF: no shared n-gram, so
        # their order in the list is arbitrary).
        idx = _merged(img_idx, np.where(txt_sims > 0, txt_idx, -1))
    return pair_sims(idx, image, text, titled, queries)


def sweep_pairs(pairs: Pairs, labels, combo: TextCombination, thresholds, min2=None):
    """Best (threshold, text threshold or None, SweepResult) over `thresholds` (and, for
    union, jointly over the title grid: one vectorised sweep per title threshold)."""
    if combo.mode != "union":
        result = threshold_sweep(pairs.scores(combo), pairs.idx, labels, thresholds, min2=min2)
        return result.best_threshold, None, result
    best = None
    for tt in combo.text_grid:
        result = threshold_sweep(pairs.scores(combo, tt), pairs.idx, labels, thresholds, min2=min2)
        if best is None or result.best_f1 > best[2].best_f1:
            best = (result.best_threshold, float(tt), result)
    return best


def combined_matches(
    pairs: Pairs, ids, combo: TextCombination, threshold: float, text_threshold=None, min2=None
) -> list[list]:
    """Each row's matches (itself first) under the mode's rule at the chosen thresholds."""
    return matches_from_threshold(
        pairs.scores(combo, text_threshold), pairs.idx, ids, threshold, min2=min2
    )


def ranked(
    pairs: Pairs, combo: TextCombination, text_threshold: float | None = None
) -> tuple[np.ndarray, Pairs]:
    """Each row's score under the mode's rule and its candidates, best first as
    `threshold_sweep` orders them (stable: ties keep the candidate order; -inf, idx -1
    where there is none). For queries outside the gallery, which have no row to leave out."""
    s = np.where(pairs.idx >= 0, pairs.scores(combo, text_threshold), -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")

    def take(x):
        return np.take_along_axis(x, order, 1)

    return take(s), Pairs(take(pairs.idx), take(pairs.image), take(pairs.text))


def text_matching(
    emb, sims, idx, text, titled, labels, combo, thresholds, k, chosen=None, min2=None
) -> tuple[dict, dict]:
    """Title-only and combined scores of one fold: (metrics, chosen thresholds).

    `chosen` None: choose on this fold (validation); else score at those (test)."""
    text_knn = title_knn(text, titled, k)
    t_text = [chosen["text_only"]] if chosen else thresholds
    text_only = threshold_sweep(*text_knn, labels, t_text, min2=min2)
    pairs = candidate_pairs(combo, emb, text, titled, k, (sims, idx), text_knn)
    if chosen is None:
        t, tt, result = sweep_pairs(pairs, labels, combo, thresholds, min2)
    else:
        t, tt = chosen["threshold"], chosen["text_threshold"]
        fixed = replace(combo, text_thresholds=(tt, tt, 1)) if tt is not None else combo
        _, _, result = sweep_pairs(pairs, labels, fixed, [t], min2)
    b = result.best_index
    metrics = {
        "f1": result.best_f1,
        "threshold": t,
        "precision": float(result.precision[b]),
        "recall": float(result.recall[b]),
        "f1_text": text_only.best_f1,
        "threshold_text_only": text_only.best_threshold,
    }
    if tt is not None:
        metrics["threshold_text"] = tt
    picked = {"threshold": t, "text_threshold": tt, "text_only": text_only.best_threshold}
    return metrics, picked
