"""Product matching by similarity threshold (Shopee "Price Match Guarantee" metric).

One kNN search of a set against itself (k up to 51) gives every posting's candidates; a
posting's predicted matches are itself plus the candidates whose similarity reaches a
threshold. The competition scores the mean over postings of F1 = 2|P n T| / (|P| + |T|),
where T is the posting's whole label group including itself. Because every threshold only
re-reads the same similarities, a whole sweep costs one search.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np

from shared.atomic import atomic_write

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


def _candidates(
    sims: Any, idx: Any, n_gallery: int, query_ids: Any, max_neighbours: int
) -> _Candidates:
    s, ix = _float_sims(sims), _numpy(idx).astype(np.int64, copy=False)
    if s.ndim != 2 or s.shape != ix.shape:
        raise ValueError(f"sims {s.shape} and idx {ix.shape} must be equal 2-D [N, k]")
    self_ids = _self_ids(s.shape[0], n_gallery, query_ids)
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


def threshold_sweep(
    sims: Any,
    idx: Any,
    labels: Any,
    thresholds: Any,
    *,
    query_ids: Any = None,
    min2: float | None = None,
    max_neighbours: int = MAX_NEIGHBOURS,
    threads: int | None = None,
) -> SweepResult:
    """Shopee F1, precision and recall of "match if sim >= t" for every threshold t at once.

    `sims`, `idx` [N, k] come from searching the set against itself; `labels` [Ng] are the
    gallery's label groups. Row i is gallery item `query_ids[i]` (default: item i), so a
    subset of rows can be scored against the whole gallery. Truth T = every gallery item
    with the row's label, itself included (full group sizes, found or not). Prediction P =
    the row itself (always, counted once, returned by the search or not) plus its other
    neighbours with sim >= t, at most `max_neighbours` of them (the best ones). `min2`: a
    row left with only itself keeps its nearest other neighbour if that one's sim >= min2.

    O(N k + T), not O(N k T): a row's scores change only where its candidates, taken in
    similarity order, cross a threshold, so one walk down each row (`_sweep_rows`) adds
    each change to a histogram over the sorted thresholds, and a cumulative sum from the
    top gives every threshold's total at once. Blocks of rows run on up to `threads` threads
    (default: the CPUs this process may use; one thread per 250k neighbour entries at most).
    """
    y = _numpy(labels).reshape(-1)
    thr = _numpy(thresholds).astype(np.float64).reshape(-1)
    if thr.size == 0:
        raise ValueError("thresholds must not be empty")
    if not np.isfinite(thr).all():
        raise ValueError("thresholds must be finite")
    if max_neighbours < 0:
        raise ValueError(f"max_neighbours must be >= 0, got {max_neighbours}")
    s_all, ix_all = _float_sims(sims), _numpy(idx).astype(np.int64, copy=False)
    if s_all.ndim != 2 or s_all.shape != ix_all.shape:
        raise ValueError(f"sims {s_all.shape} and idx {ix_all.shape} must be equal 2-D [N, k]")
    n_gallery = y.shape[0]
    self_ids = _self_ids(s_all.shape[0], n_gallery, query_ids)

    codes, counts = _label_codes(y)
    # Thresholds that fall on one value of the similarities' dtype score alike: sweep the
    # distinct ones, in order, and hand each threshold its value's scores.
    sorted_thr, position = np.unique(_ceil_to(thr, s_all.dtype), return_inverse=True)
    max_n = int(min(max_neighbours, s_all.shape[1]))
    with np.errstate(divide="ignore"):  # 1 / n for every count a score can divide by
        inverse = 1.0 / np.arange(max_n + int(counts.max()) + 3, dtype=np.float64)
    s_all, ix_all = np.ascontiguousarray(s_all), np.ascontiguousarray(ix_all)
    shared = (
        codes,  # int32: the per-neighbour label lookup is a random read
        counts.astype(np.int64, copy=False),
        sorted_thr,
        *_bin_table(sorted_thr),
        inverse,
        -np.inf if min2 is None else float(min2),
        min2 is not None,
        max_n,
    )

    def sweep_block(lo: int, hi: int) -> tuple[int, np.ndarray, np.ndarray]:
        # hist[j]: summed score change (F1, precision, recall) of the rows whose predictions
        # grow between sorted thresholds j and j - 1; base: every row's score no threshold
        # changes (no candidate, or min2's one).
        banks, base = np.zeros((sorted_thr.size + 1, _HIST_BANKS, 3)), np.zeros(3)
        rows = slice(lo, hi)
        flat = banks.reshape(-1)
        status = _sweep_rows(s_all[rows], ix_all[rows], self_ids[rows], *shared, flat, base)
        return status, banks.sum(1), base

    n_rows = s_all.shape[0]
    workers = _sweep_threads(threads, s_all.size)
    if workers == 1:
        blocks = [sweep_block(0, n_rows)]
    else:  # the compiled pass releases the GIL: row blocks run in parallel
        bounds = np.linspace(0, n_rows, workers + 1).astype(int)
        with ThreadPoolExecutor(workers) as pool:
            blocks = list(pool.map(sweep_block, bounds[:-1], bounds[1:]))
    statuses = {status for status, _, _ in blocks}
    if _NAN in statuses:
        raise ValueError("sims hold NaN for a neighbour")
    if _OUT_OF_RANGE in statuses:
        raise ValueError(f"an index is out of range for a gallery of {n_gallery}")
    hist = sum(h for _, h, _ in blocks)
    base = sum(b for _, _, b in blocks)

    above = np.cumsum(hist[::-1], axis=0)[::-1][1:]  # sorted threshold j: sum of hist[j + 1:]
    f1, precision, recall = np.ascontiguousarray(((base + above) / n_rows)[position.reshape(-1)].T)
    return SweepResult(thr, f1, precision, recall, int(np.argmax(f1)))


def _label_codes(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 codes that are equal where labels are, and each code's group size.

    Small non-negative integer labels (the usual label_group codes) are their own codes,
    counted in one pass; anything else goes through np.unique's sort.
    """
    if y.dtype.kind in "iu" and y.size and y.min() >= 0 and y.max() < 4 * y.size + 1024:
        return y.astype(np.int32), np.bincount(y)
    _, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
    return codes.reshape(-1).astype(np.int32), counts


_OK, _NAN, _OUT_OF_RANGE = 0, 1, 2
# Consecutive candidates often share a bin; adding them to one histogram would chain each
# add on the one before through memory. Candidate e adds to copy e % 4 of it instead.
_HIST_BANKS = 4
_ENTRIES_PER_THREAD = 250_000  # below this a thread costs more than it saves


def _sweep_threads(threads: int | None, entries: int) -> int:
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return max(1, min(threads, entries // _ENTRIES_PER_THREAD))


def _bin_table(sorted_thr: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any, Any]:
    """Lookup tables that make `searchsorted(sorted_thr, v, "right")` a multiply-add, a
    clamp and two reads, with no branch (`sorted_thr`: distinct, increasing).

    The thresholds' range is cut into cells at least twice as fine as the closest pair
    of thresholds (at least 4 and at most 64 cells per threshold). A value's cell is
    `clamp(v * scale + shift, 0, top)` truncated: a rounded multiply-add cannot reorder
    values, so a value and a threshold in different cells compare as their cells do.
    `below[c]` counts the thresholds in cells under c; `inside[c]` is the one threshold in
    cell c (+inf if none), which a value of that cell passes or not. A cell holding two or
    more thresholds is marked `below = -1` and searched. Returns (below, inside, scale,
    shift), the last three of `sorted_thr`'s dtype; scale 0 when no map is usable (every
    cell marked).
    """
    dt = sorted_thr.dtype.type
    # Small enough to stay in the L1/L2 caches: a lookup per neighbour entry.
    spread = float(sorted_thr[-1]) - float(sorted_thr[0])
    gaps = np.diff(sorted_thr.astype(np.float64))  # > 0: the thresholds are distinct
    with np.errstate(over="ignore"):
        fine = np.ceil(2 * spread / gaps.min()) if gaps.size else 0.0
    n_thr = len(sorted_thr)
    cells = int(min(max(fine, 4 * n_thr), 64 * n_thr, 1 << 20))  # float32-exact: < 2**24
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scale = dt(cells / spread) if spread > 0 else dt(0)
        shift = dt(2.0 - float(sorted_thr[0]) * float(scale))
    top = cells + 3
    inside = np.full(top + 1, np.inf, sorted_thr.dtype)
    if not (np.isfinite(scale) and np.isfinite(shift) and scale > 0):
        return np.full(top + 1, -1, np.int32), inside, dt(0), dt(0)
    with np.errstate(over="ignore", invalid="ignore"):
        thr_cells = np.clip(sorted_thr * scale + shift, 0, top).astype(np.int64)
    below = np.searchsorted(thr_cells, np.arange(top + 1), side="left").astype(np.int32)
    held = np.bincount(thr_cells, minlength=top + 1)
    inside[thr_cells] = sorted_thr  # right where a cell holds one threshold
    below[held > 1] = -1
    return below, inside, scale, shift


@numba.njit(cache=True, nogil=True)
def _sorted_candidates(s_row, ix_row, own, codes, code, max_n, vs, tr, key):
    """A row that is not in similarity order: its candidates, best first (a stable sort,
    ties keep their column order), the best `max_n` written to vs / tr. Returns how many,
    or -1 if a candidate's similarity is NaN."""
    k = s_row.shape[0]
    for e in range(k):
        j, v = ix_row[e], s_row[e]
        if j < 0 or j == own:
            key[e] = np.inf
        elif v != v:
            return -1
        else:
            key[e] = -v
    order = np.argsort(key, kind="mergesort")
    n = 0
    for e in order:
        if n == max_n or key[e] == np.inf:
            break
        vs[n] = s_row[e]
        tr[n] = codes[ix_row[e]] == code
        n += 1
    return n


# Numba wraps every signed index for negative values (a shift, an and and an or per
# access); an unsigned one skips that. The inner loops below index with known non-negative
# values cast to uint64 (an int64 first: a float's direct uint64 conversion is slow).
_u = np.uint64


@numba.njit(cache=True, nogil=True)
def _plain_row(s_row, ix_row, own, last):
    """Whether a row is the usual FAISS self-search row: the query itself first, then only
    other in-range items, similarities non-increasing and none NaN. Its candidates are then
    simply columns 1.. in order. Two branch-free counting loops (vectorised by LLVM)."""
    k = s_row.shape[0]
    if k == 0 or ix_row[0] != own:
        return False
    bad = 0
    for e in range(1, k):
        j = ix_row[_u(e)]
        bad += (_u(j) > last) | (j == own)  # as unsigned, -1 is out of range too
    for e in range(k - 1):
        bad += not s_row[_u(e)] >= s_row[_u(e + 1)]  # NaN too
    return bad == 0


@numba.njit(cache=True, nogil=True)
def _sweep_rows(
    s, ix, self_ids, codes, counts, sorted_thr, below, inside, scale, shift, inverse, min2,
    use_min2, max_n, hist, base,
):  # fmt: skip
    """The sweep's one pass over the rows, compiled: a few ns per neighbour entry.

    Per row, short straight-line loops (they run much faster than one loop with a branch
    per step, or one loop doing everything):
    1. the row's candidates (valid other neighbours, the best `max_n`) in similarity order,
       each one's bin (the count of sorted thresholds <= its similarity, that is the
       thresholds that predict it; `_bin_table`) and whether it is a true match. A plain
       FAISS row (`_plain_row`) is read in place; any other row is copied first, skipping
       self and missing entries, and sorted if need be (`_sorted_candidates`);
    2. walk the candidates; after each joins, the change in the row's scores is added to
       its bin of `hist` (flat [bins, _HIST_BANKS, 3]: F1, precision, recall per bin).
    Returns _OK, _NAN (a candidate's sim is NaN) or _OUT_OF_RANGE (an index >= the
    gallery), for the caller to raise.
    """
    n_rows, k = s.shape
    n_gallery = codes.shape[0]
    last = _u(n_gallery - 1)
    top = s.dtype.type(below.shape[0] - 1)
    zero = s.dtype.type(0)
    searched = scale == 0  # no usable lookup map: search every candidate
    direct = not searched  # every cell gives its bin without a search
    for c in range(below.shape[0]):
        direct &= below[c] >= 0
    vs = np.empty(k, s.dtype)  # a copied row's candidates' similarities, best first
    tr = np.empty(k, np.int64)  # 1 where that candidate is a true match
    bins = np.empty(k, np.int64)
    key = np.empty(k, np.float64)
    for i in range(n_rows):
        own = self_ids[i]
        code = codes[own]
        g = counts[code]
        s_row, ix_row = s[i], ix[i]

        if direct and _plain_row(s_row, ix_row, own, last):
            n = min(k - 1, max_n)
            for e in range(n):
                v = s_row[_u(e + 1)]
                c = _u(np.int64(min(max(v * scale + shift, zero), top)))
                bins[_u(e)] = below[c] + (v >= inside[c])
                tr[_u(e)] = codes[_u(ix_row[_u(e + 1)])] == code
            nearest = s_row[1] if n > 0 else zero
        else:
            n, prev, unsorted = 0, np.inf, False
            for e in range(k):
                j = ix_row[_u(e)]
                if j < 0 or j == own:
                    continue
                if j >= n_gallery:
                    return _OUT_OF_RANGE
                v = s_row[_u(e)]
                unsorted |= not v <= prev  # NaN too
                prev = v
                if n < max_n:
                    vs[_u(n)] = v
                    tr[_u(n)] = codes[_u(j)] == code
                    n += 1
            if unsorted:
                n = _sorted_candidates(s_row, ix_row, own, codes, code, max_n, vs, tr, key)
                if n < 0:
                    return _NAN
            marked = searched
            if not searched:
                for e in range(n):
                    v = vs[_u(e)]
                    c = _u(np.int64(min(max(v * scale + shift, zero), top)))
                    b = below[c]
                    marked |= b < 0
                    bins[_u(e)] = b + (v >= inside[c])
            if marked:  # a cell with several thresholds, or no usable map: binary search
                for e in range(n):
                    v = vs[e]
                    if searched or below[np.int64(min(max(v * scale + shift, zero), top))] < 0:
                        bins[e] = np.searchsorted(sorted_thr, v, side="right")
            nearest = vs[0] if n > 0 else zero

        # After candidate e joins, m = e + 1 others are predicted, tp of them true; (f, p, r)
        # the row's scores before it.
        tp, first = 0, 0
        if use_min2 and n > 0 and nearest >= min2:  # predicted at any threshold
            tp, first = tr[0], 1
        inv_g = inverse[g]
        f = 2.0 * (1 + tp) * inverse[1 + first + g]
        p = (1 + tp) * inverse[1 + first]
        r = (1 + tp) * inv_g
        base[0] += f
        base[1] += p
        base[2] += r
        for e in range(first, n):
            b = bins[_u(e)]
            if b == 0:  # below every threshold, as is the rest of the row
                break
            tp += tr[_u(e)]
            joined = np.float64(1 + tp)
            f1 = 2.0 * joined * inverse[_u(e + 2 + g)]
            p1 = joined * inverse[_u(e + 2)]
            r1 = joined * inv_g
            h = _u(3 * (_HIST_BANKS * b + (e & (_HIST_BANKS - 1))))
            hist[h] += f1 - f
            hist[h + _u(1)] += p1 - p
            hist[h + _u(2)] += r1 - r
            f, p, r = f1, p1, r1
    return _OK


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

    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png")
    return path
