"""Product matching by similarity threshold (Shopee "Price Match Guarantee" metric).

One kNN search of a set against itself (k up to 51) gives every posting's candidates; a
posting's predicted matches are itself plus the candidates whose similarity reaches a
threshold. The competition scores the mean over postings of F1 = 2|P n T| / (|P| + |T|),
where T is the posting's whole label group including itself. Because every threshold only
re-reads the same similarities, a whole sweep costs one search.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The competition caps groups at 50 and a k = 51 self-search returns self + 50 others.
MAX_NEIGHBOURS = 50


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


@dataclass(frozen=True)
class _Candidates:
    """A self-search result with each row's other neighbours marked, shared by the sweep,
    the matches and the blend so all three apply one rule."""

    sims: np.ndarray  # float64 [N, k], -inf where not a valid other neighbour
    idx: np.ndarray  # int64 [N, k]; -1 where FAISS found nothing
    cand: np.ndarray  # bool [N, k], other (non-self) neighbours that may be predicted
    self_ids: np.ndarray  # int64 [N], gallery position of each query row
    first: np.ndarray  # int64 [N], column of the nearest candidate (0 where there is none)
    has_other: np.ndarray  # bool [N], whether the row has any candidate

    @property
    def nearest_sim(self) -> np.ndarray:
        """Similarity of the nearest other neighbour, -inf where there is none."""
        if not self.cand.shape[1]:
            return np.full(len(self.cand), -np.inf)
        return np.where(self.has_other, self.sims[np.arange(len(self.sims)), self.first], -np.inf)


def _candidates(
    sims: Any, idx: Any, n_gallery: int, query_ids: Any, max_neighbours: int
) -> _Candidates:
    s = _numpy(sims).astype(np.float64)
    ix = _numpy(idx).astype(np.int64)
    if s.ndim != 2 or s.shape != ix.shape:
        raise ValueError(f"sims {s.shape} and idx {ix.shape} must be equal 2-D [N, k]")
    if s.shape[0] == 0 or n_gallery == 0:
        raise ValueError("empty validation fold: no rows to match")
    if query_ids is None:
        if s.shape[0] != n_gallery:
            raise ValueError(
                f"{s.shape[0]} query rows but {n_gallery} gallery items: pass query_ids"
            )
        self_ids = np.arange(n_gallery, dtype=np.int64)
    else:
        self_ids = _numpy(query_ids).astype(np.int64).reshape(-1)
        if self_ids.shape[0] != s.shape[0]:
            raise ValueError(f"{self_ids.shape[0]} query_ids for {s.shape[0]} rows")
    if (ix.size and ix.max() >= n_gallery) or self_ids.max() >= n_gallery or self_ids.min() < 0:
        raise ValueError(f"an index or query id is out of range for a gallery of {n_gallery}")
    if max_neighbours < 0:
        raise ValueError(f"max_neighbours must be >= 0, got {max_neighbours}")

    valid = (ix >= 0) & (ix != self_ids[:, None])
    # "The nearest other" and "the 50 best" need the candidates in similarity order. FAISS
    # rows already are (masking self out keeps the others' order), so sort only when not.
    unsorted = np.any(s[:, :-1] < s[:, 1:])
    s = np.where(valid, s, -np.inf)
    if unsorted:
        order = np.argsort(-s, axis=1, kind="stable")
        s = np.take_along_axis(s, order, 1)
        ix = np.take_along_axis(ix, order, 1)
        valid = np.take_along_axis(valid, order, 1)
    cand = valid & (np.cumsum(valid, axis=1) <= max_neighbours)
    if cand.shape[1]:
        first, has_other = np.argmax(cand, axis=1), cand.any(axis=1)
    else:
        first, has_other = np.zeros(len(cand), np.int64), np.zeros(len(cand), bool)
    return _Candidates(s, ix, cand, self_ids, first, has_other)


@dataclass(frozen=True)
class SweepResult:
    """Mean F1 / precision / recall over postings, one value per threshold."""

    thresholds: np.ndarray
    f1: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    best_index: int

    @property
    def best_threshold(self) -> float:
        return float(self.thresholds[self.best_index])

    @property
    def best_f1(self) -> float:
        return float(self.f1[self.best_index])

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and floats, ready for JSON or a logger."""
        return {
            "thresholds": self.thresholds.tolist(),
            "f1": self.f1.tolist(),
            "precision": self.precision.tolist(),
            "recall": self.recall.tolist(),
            "best_index": self.best_index,
            "best_threshold": self.best_threshold,
            "best_f1": self.best_f1,
        }


def threshold_sweep(
    sims: Any,
    idx: Any,
    labels: Any,
    thresholds: Any,
    *,
    query_ids: Any = None,
    min2: float | None = None,
    max_neighbours: int = MAX_NEIGHBOURS,
) -> SweepResult:
    """Shopee F1, precision and recall of "match if sim >= t" for every threshold t at once.

    `sims`, `idx` [N, k] come from searching the set against itself; `labels` [Ng] are the
    gallery's label groups. Row i is gallery item `query_ids[i]` (default: item i), so a
    subset of rows can be scored against the whole gallery. Truth T = every gallery item
    with the row's label, itself included (full group sizes, found or not). Prediction P =
    the row itself (always, counted once, returned by the search or not) plus its other
    neighbours with sim >= t, at most `max_neighbours` of them (the best ones). `min2`: a
    row left with only itself keeps its nearest other neighbour if that one's sim >= min2.

    Vectorised, and O(N k + T) rather than O(N T): taking a row's candidates in similarity
    order, each one grows P by one item and changes the row's score by a known delta; a
    candidate is predicted exactly for the thresholds <= its similarity, so one histogram of
    the deltas over the sorted thresholds, summed from the top, gives every threshold's
    total at once.
    """
    y = _numpy(labels).reshape(-1)
    c = _candidates(sims, idx, y.shape[0], query_ids, max_neighbours)
    thr = _numpy(thresholds).astype(np.float64).reshape(-1)
    if thr.size == 0:
        raise ValueError("thresholds must not be empty")
    if not np.isfinite(thr).all():
        raise ValueError("thresholds must be finite")

    _, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
    codes = codes.reshape(-1)
    row_code = codes[c.self_ids]
    truth = counts[row_code].astype(np.float64)[:, None]
    match = c.cand & (codes[np.clip(c.idx, 0, None)] == row_code[:, None])
    rows = np.arange(len(row_code))

    # Row scores with the row itself plus m other predictions, tp of them true.
    metrics = {
        "f1": lambda m, tp: 2.0 * (1.0 + tp) / (1.0 + m + truth),
        "precision": lambda m, tp: (1.0 + tp) / (1.0 + m),
        "recall": lambda m, tp: (1.0 + tp) / truth,
    }
    # The state after / before each candidate joins P (it joins after all better ones).
    m_after = np.cumsum(c.cand, axis=1).astype(np.float64)
    tp_after = np.cumsum(match, axis=1).astype(np.float64)
    m_before, tp_before = np.maximum(m_after - 1.0, 0.0), tp_after - match
    # min2: a row whose P would be only itself predicts its nearest other instead, so its
    # "nothing above the threshold" score is that of one prediction and the first
    # candidate's delta is zero.
    keep_nearest = np.zeros(len(rows), dtype=bool)
    if min2 is not None:
        keep_nearest = c.has_other & (c.nearest_sim >= min2)
    nearest_cell = (rows[keep_nearest], c.first[keep_nearest])
    m_base = keep_nearest.astype(np.float64)[:, None]
    tp_base = np.zeros_like(m_base)
    tp_base[keep_nearest, 0] = match[nearest_cell]

    order = np.argsort(thr, kind="stable")
    # pos = how many sorted thresholds are <= sim: the candidate is predicted for sorted
    # thresholds 0 .. pos-1. Non-candidates have delta 0, so their pos does not matter.
    pos = np.searchsorted(thr[order], c.sims, side="right").ravel()
    out = {}
    for name, score in metrics.items():
        delta = np.where(c.cand, score(m_after, tp_after) - score(m_before, tp_before), 0.0)
        delta[nearest_cell] = 0.0
        base = score(m_base, tp_base)
        hist = np.bincount(pos, weights=delta.ravel(), minlength=thr.size + 1)
        above = np.cumsum(hist[::-1])[::-1][1:]  # sorted threshold t: sum of hist[t + 1:]
        sorted_mean = (base.sum() + above) / len(rows)
        out[name] = np.empty_like(sorted_mean)
        out[name][order] = sorted_mean
    return SweepResult(thr, out["f1"], out["precision"], out["recall"], int(np.argmax(out["f1"])))


def matches_from_threshold(
    sims: Any,
    idx: Any,
    ids: Any,
    threshold: float,
    min2: float | None = None,
    *,
    query_ids: Any = None,
    max_neighbours: int = MAX_NEIGHBOURS,
) -> list[list[Any]]:
    """Predicted matches per row as ids: itself first, then neighbours with sim >= threshold.

    Same rule as `threshold_sweep` (at most `max_neighbours` others, best first; `min2`
    fallback), so the F1 of these lists equals the sweep's F1 at `threshold`. `ids` [Ng] name
    the gallery items (e.g. posting_id); the lists are what matches.csv holds.
    """
    id_arr = _numpy(ids).reshape(-1)
    c = _candidates(sims, idx, id_arr.shape[0], query_ids, max_neighbours)
    chosen = c.cand & (c.sims >= threshold)
    if min2 is not None:
        lone = np.flatnonzero(~chosen.any(axis=1) & c.has_other & (c.nearest_sim >= min2))
        chosen[lone, c.first[lone]] = True
    return [
        [id_arr[self_id].item(), *id_arr[row_idx[row_chosen]].tolist()]
        for self_id, row_idx, row_chosen in zip(c.self_ids, c.idx, chosen, strict=True)
    ]


def neighbourhood_blend(
    embeddings: Any,
    sims: Any,
    idx: Any,
    *,
    k: int | None = None,
    threshold: float | None = None,
    chunk_size: int = 4096,
) -> Any:
    """Replace each embedding by the similarity-weighted mean of itself and its neighbours.

    Query expansion as in the Shopee winning solutions ("neighbourhood blending"; alpha-QE
    of Radenovic et al. 2018 with alpha = 1): e_i <- normalise(w_ii e_i + sum_j s_ij e_j).
    Neighbours are row i's other items from the self-search (`idx` indexes `embeddings`),
    optionally only the `k` most similar and only those with sim >= `threshold`. The row
    itself always takes part with its own similarity w_ii = e_i . e_i (1 for unit vectors).
    Negative similarities get weight 0, so the result stays a weighted mean. Returns the
    kind of `embeddings` (torch tensor on its device, or numpy), L2-normalised.
    """
    is_torch = hasattr(embeddings, "detach")
    e = _numpy(embeddings).astype(np.float32)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [N, D], got {e.shape}")
    if k is not None and k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    max_n = np.iinfo(np.int64).max if k is None else int(k)
    c = _candidates(sims, idx, e.shape[0], None, max_n)
    use = c.cand if threshold is None else c.cand & (c.sims >= threshold)
    weights = np.where(use, np.clip(c.sims, 0.0, None), 0.0).astype(np.float32)
    neighbours = np.clip(c.idx, 0, None)

    out = e * np.einsum("nd,nd->n", e, e)[:, None]
    for start in range(0, e.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        out[rows] += np.einsum("nk,nkd->nd", weights[rows], e[neighbours[rows]])
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    if is_torch:
        import torch

        return torch.from_numpy(out).to(device=embeddings.device, dtype=embeddings.dtype)
    return out


def plot_threshold_sweep(result: SweepResult, path: str | os.PathLike) -> Path:
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

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
