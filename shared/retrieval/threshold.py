"""Product matching by similarity threshold (Shopee "Price Match Guarantee" metric).

One kNN search of a set against itself (k up to 51) gives every posting's candidates; a
posting's predicted matches are itself plus the candidates whose similarity reaches a
threshold. The competition scores the mean over postings of F1 = 2|P n T| / (|P| + |T|),
where T is the posting's whole label group including itself. Because every threshold only
re-reads the same similarities, a whole sweep costs one search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.retrieval.search import eval_search

# The competition caps groups at 50 and a k = 51 self-search returns self + 50 others.
MAX_NEIGHBOURS = 50


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _float_sims(x: Any) -> np.ndarray:
    """Similarities as float32 when they fit it exactly (float32 or narrower), else float64."""
    s = _numpy(x)
    exact32 = np.issubdtype(s.dtype, np.floating) and s.dtype.itemsize <= 4
    return s.astype(np.float32 if exact32 else np.float64, copy=False)


def _ceil_to(values: Any, dtype: Any) -> np.ndarray:
    """The smallest `dtype` number >= each value (float64 in).

    For x of that dtype, `x >= v` exactly when `x >= _ceil_to(v)`: float32 similarities are
    compared with float64 thresholds without widening the similarities.
    """
    v = np.asarray(values, dtype=np.float64)
    if np.dtype(dtype) == np.float64:
        return v
    with np.errstate(over="ignore"):
        out = v.astype(dtype)
    low = out < v
    out[low] = np.nextafter(out[low], np.asarray(np.inf, dtype))
    return out


@dataclass(frozen=True)
class _Candidates:
    """A self-search result with each row's other neighbours marked, shared by the sweep,
    the matches and the blend so all three apply one rule."""

    sims: np.ndarray  # float32 or float64 [N, k], -inf where not a candidate
    idx: np.ndarray  # int64 [N, k]; -1 where FAISS found nothing
    cand: np.ndarray  # bool [N, k], other (non-self) neighbours that may be predicted
    self_ids: np.ndarray  # int64 [N], gallery position of each query row
    first: np.ndarray  # int64 [N], column of the nearest candidate (0 where there is none)
    has_other: np.ndarray  # bool [N], whether the row has any candidate

    @property
    def nearest_sim(self) -> np.ndarray:
        """Similarity (float64) of the nearest other neighbour, -inf where there is none."""
        if not self.cand.shape[1]:
            return np.full(len(self.cand), -np.inf)
        nearest = self.sims[np.arange(len(self.sims)), self.first].astype(np.float64)
        return np.where(self.has_other, nearest, -np.inf)


def _self_ids(n_rows: int, n_gallery: int, query_ids: Any) -> np.ndarray:
    if n_rows == 0 or n_gallery == 0:
        raise ValueError("empty validation fold: no rows to match")
    if query_ids is None:
        if n_rows != n_gallery:
            raise ValueError(f"{n_rows} query rows but {n_gallery} gallery items: pass query_ids")
        return np.arange(n_gallery, dtype=np.int64)
    self_ids = _numpy(query_ids).astype(np.int64).reshape(-1)
    if self_ids.shape[0] != n_rows:
        raise ValueError(f"{self_ids.shape[0]} query_ids for {n_rows} rows")
    if self_ids.max() >= n_gallery or self_ids.min() < 0:
        raise ValueError(f"a query id is out of range for a gallery of {n_gallery}")
    return self_ids


def _checked(
    sims: Any, idx: Any, n_gallery: int, query_ids: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Similarities, indices and each row's gallery position, shapes checked."""
    s, ix = _float_sims(sims), _numpy(idx).astype(np.int64, copy=False)
    if s.ndim != 2 or s.shape != ix.shape:
        raise ValueError(f"sims {s.shape} and idx {ix.shape} must be equal 2-D [N, k]")
    return s, ix, _self_ids(s.shape[0], n_gallery, query_ids)


def _candidates(
    sims: Any, idx: Any, n_gallery: int, query_ids: Any, max_neighbours: int
) -> _Candidates:
    s, ix, self_ids = _checked(sims, idx, n_gallery, query_ids)
    return _row_candidates(s, ix, n_gallery, self_ids, max_neighbours)


def _row_candidates(
    s: np.ndarray, ix: np.ndarray, n_gallery: int, self_ids: np.ndarray, max_neighbours: int
) -> _Candidates:
    """`_candidates` of checked arrays (any block of rows: each row is handled alone)."""
    if max_neighbours < 0:
        raise ValueError(f"max_neighbours must be >= 0, got {max_neighbours}")
    n, k = s.shape
    if ix.size and ix.max() >= n_gallery:
        raise ValueError(f"an index is out of range for a gallery of {n_gallery}")
    valid = ix != self_ids[:, None]
    if ix.size and ix.min() < 0:  # -1: FAISS found nothing
        valid &= ix >= 0
    if np.any(np.isnan(s) & valid):  # a NaN ranks nowhere: no rule can place it
        raise ValueError("sims hold NaN for a neighbour")
    # "The nearest other" and "the 50 best" need the candidates in similarity order. FAISS
    # rows already are (masking self out keeps the others' order), so sort only when not.
    unsorted = k > 1 and bool(np.any(s[:, :-1] < s[:, 1:]))
    s = np.where(valid, s, -np.inf)
    if unsorted:
        order = np.argsort(-s, axis=1, kind="stable")
        s = np.take_along_axis(s, order, 1)
        ix = np.take_along_axis(ix, order, 1)
        valid = np.take_along_axis(valid, order, 1)
    cand = valid
    if k > max_neighbours:  # drop the candidates past the best max_neighbours
        over = np.flatnonzero(np.count_nonzero(valid, axis=1) > max_neighbours)
        if over.size:
            kept = valid[over] & (np.cumsum(valid[over], axis=1) <= max_neighbours)
            cand = valid.copy()
            cand[over] = kept
            s[over] = np.where(kept, s[over], -np.inf)
    if k:
        first = np.argmax(cand, axis=1)
        has_other = cand[np.arange(n), first]
    else:
        first, has_other = np.zeros(n, np.int64), np.zeros(n, bool)
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


# Rows per block of the sweep: bounds its working memory (about 0.4 KB per neighbour entry
# in flight) whatever the fold's size.
_SWEEP_ROWS = 8192


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

    O(N k log T), not O(N k T): a threshold predicts a prefix of each row's candidates
    (best first), so a row's score at t is its score with none plus the changes made by
    the candidates that t lets in. Each change is added to a histogram over the sorted
    thresholds, and a cumulative sum from the top gives every threshold's total at once.
    """
    y = _numpy(labels).reshape(-1)
    thr = _numpy(thresholds).astype(np.float64).reshape(-1)
    if thr.size == 0:
        raise ValueError("thresholds must not be empty")
    if not np.isfinite(thr).all():
        raise ValueError("thresholds must be finite")
    s, ix, self_ids = _checked(sims, idx, y.shape[0], query_ids)
    _, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
    # Thresholds that fall on one value of the similarities' dtype score alike: sweep the
    # distinct ones, in order, and hand each threshold its value's scores.
    sorted_thr, position = np.unique(_ceil_to(thr, s.dtype), return_inverse=True)
    hist, base = np.zeros((sorted_thr.size + 1, 3)), np.zeros(3)
    for lo in range(0, s.shape[0], _SWEEP_ROWS):
        rows = slice(lo, lo + _SWEEP_ROWS)
        c = _row_candidates(s[rows], ix[rows], y.shape[0], self_ids[rows], max_neighbours)
        block_hist, block_base = _score_changes(c, codes.reshape(-1), counts, sorted_thr, min2)
        hist += block_hist
        base += block_base
    above = np.cumsum(hist[::-1], axis=0)[::-1][1:]  # sorted threshold j: sum of hist[j + 1:]
    scores = (base + above) / s.shape[0]
    f1, precision, recall = np.ascontiguousarray(scores[position.reshape(-1)].T)
    return SweepResult(thr, f1, precision, recall, int(np.argmax(f1)))


def _score_changes(
    c: _Candidates,
    codes: np.ndarray,
    counts: np.ndarray,
    sorted_thr: np.ndarray,
    min2: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The change each candidate makes to its row's (F1, precision, recall) when it joins,
    summed per bin (how many sorted thresholds predict it; [T + 1, 3]), and the rows' summed
    scores with no candidate predicted ([3]). Non-candidates change nothing (bin 0)."""
    own = codes[c.self_ids]
    group = counts[own][:, None].astype(np.float64)
    hit = c.cand & (codes[np.maximum(c.idx, 0)] == own[:, None])
    none = np.zeros((len(own), 1), np.int64)
    # Column e + 1: |P n T| and |P| once candidate e has joined; column 0: only the row itself.
    inter = 1.0 + np.cumsum(np.hstack([none, hit]), axis=1)
    size = 1.0 + np.cumsum(np.hstack([none, c.cand]), axis=1)
    scores = (2 * inter / (size + group), inter / size, inter / group)
    bins = np.searchsorted(sorted_thr, c.sims, side="right")  # -inf (no candidate): bin 0
    if min2 is not None:  # the nearest candidate joins at every threshold
        kept = np.flatnonzero(c.has_other & (c.nearest_sim >= min2))
        bins[kept, c.first[kept]] = sorted_thr.size
    hist = np.stack(
        [
            np.bincount(bins.ravel(), np.diff(x, axis=1).ravel(), sorted_thr.size + 1)
            for x in scores
        ],
        axis=1,
    )
    return hist, np.array([x[:, 0].sum() for x in scores])


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
    chosen = c.cand & (c.sims >= _ceil_to(threshold, c.sims.dtype))
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
    use = c.cand if threshold is None else c.cand & (c.sims >= _ceil_to(threshold, c.sims.dtype))
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


def sweep_embeddings(
    embeddings,
    labels,
    thresholds,
    k: int = 51,
    min2: float | None = None,
    blend_k: int | None = None,
    blend_threshold: float | None = None,
    **search_kwargs,
):
    """Search (k = 51: groups of at most 50 plus the posting itself), optionally blend each
    embedding with its neighbours and search again, then sweep all thresholds.

    `search_kwargs` go to `eval_search` (index="ivf" or "hnsw", target_recall for very
    large folds)."""
    _, sims, idx = image_neighbours(embeddings, k, blend_k, blend_threshold, **search_kwargs)
    return threshold_sweep(sims, idx, np.asarray(labels), thresholds, min2=min2), sims, idx


def image_neighbours(
    embeddings, k=51, blend_k=None, blend_threshold=None, search_info=None, **search_kwargs
):
    """(embeddings as searched, sims, idx): one self-search, or two around a blend.

    The search is `eval_search`; with a tuned index, `search_info` (a dict, if given) gets
    its info, the recall the lower of the two searches'."""
    if len(embeddings) == 0:
        raise ValueError("threshold sweep on an empty validation fold")
    sims, idx, info = eval_search(embeddings, embeddings, k, **search_kwargs)
    if blend_k:
        embeddings = neighbourhood_blend(
            embeddings, sims, idx, k=blend_k, threshold=blend_threshold
        )
        sims, idx, second = eval_search(embeddings, embeddings, k, **search_kwargs)
        if info is not None:
            info = {**second, "recall": min(info["recall"], second["recall"])}
    if search_info is not None and info is not None:
        search_info.update(info)
    return embeddings, sims, idx
