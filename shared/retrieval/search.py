"""Nearest-neighbour search by inner product with FAISS.

Cosine similarity is inner product of L2-normalised vectors, so `l2_normalize` then
`knn_search` gives exact cosine top-k (FAISS `IndexFlatIP` equals matmul + top-k).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import faiss
import numpy as np
import torch

# FAISS GPU indices cannot return more neighbours than this (a limit of its GPU k-select).
GPU_MAX_K = 2048


def l2_normalize(x: Any, eps: float = 1e-12) -> Any:
    """Scale each row (last axis) to unit L2 norm; rows of zeros stay zero.

    Works on torch tensors and numpy arrays and returns the same kind, so the caller's device
    and dtype are kept.
    """
    if isinstance(x, torch.Tensor):
        return torch.nn.functional.normalize(x, p=2.0, dim=-1, eps=eps)
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"l2_normalize needs a float array, got {x.dtype}")
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, eps).astype(x.dtype, copy=False)


# |squared norm - 1| below this counts as a unit row: float32 rounding of a normalised row of
# a few thousand dims stays well inside it.
UNIT_NORM_TOL = 1e-5


def ensure_unit_rows(x: np.ndarray) -> np.ndarray:
    """`x` itself when every row already has unit L2 norm (up to float32 rounding), else
    `l2_normalize(x)`.

    Features that arrive normalised (every `embed()` output) are then searched exactly as
    given, with no copy and no re-rounding; checking costs one read of `x`.
    """
    x = np.asarray(x)
    if x.ndim == 2 and x.size:
        sq = np.einsum("ij,ij->i", x, x)
        if float(np.abs(sq - 1.0).max()) <= UNIT_NORM_TOL:  # NaN fails the test: normalise
            return x
    return l2_normalize(x)


def as_float32_matrix(x: Any, name: str) -> np.ndarray:
    """A C-contiguous float32 [N, D] numpy copy (or view) of `x`, the layout FAISS needs."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {x.shape}")
    return x


def _use_gpu(device: str) -> bool:
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if device == "cpu":
        return False
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if n_gpus > 0:
        return True
    if device == "cuda":
        warnings.warn(
            "knn_search(device='cuda'): this FAISS build has no GPU support (faiss-cpu); "
            "searching on CPU instead",
            stacklevel=3,
        )
    return False


def default_nlist(n_gallery: int) -> int:
    """IVF cell count ~ 4 * sqrt(N) (FAISS wiki guideline), never more cells than points."""
    return max(1, min(n_gallery, int(round(4 * math.sqrt(n_gallery)))))


def knn_search(
    queries: Any,
    gallery: Any,
    k: int,
    *,
    device: str = "auto",
    index: str = "flat",
    nlist: int | None = None,
    nprobe: int = 16,
    train_size: int | None = None,
    chunk_size: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery items by inner product for every query.

    Inputs are torch tensors or numpy arrays [N, D], expected already L2-normalised (then the
    scores are cosine similarities). `k` is capped at the gallery size, so the result may have
    fewer than `k` columns. Rows are sorted by similarity, highest first.

    index="flat" is exact (`IndexFlatIP`); index="ivf" trains an `IndexIVFFlat` on the gallery
    (`nlist` cells, default ~4*sqrt(N); `nprobe` cells visited per query), approximate and
    much faster on large galleries. IVF can find fewer than k items for a query: those slots
    hold index -1 and similarity -inf. Its cells are trained (k-means) on `train_size` gallery
    rows drawn at random (fixed seed), or, by default, on FAISS's own sample of at most 256
    rows per cell; training costs about train_size x nlist x dim x 10 iterations, so on one
    CPU core a sample of ~40 rows per cell keeps it to seconds at a million items.

    device="auto" uses GPU FAISS when the build has a GPU, "cuda" asks for it (and warns and
    falls back to CPU without one), "cpu" forces CPU. GPU FAISS cannot return more than 2048
    neighbours, so larger k is searched on CPU.

    Queries are searched `chunk_size` rows at a time so the distance buffers stay bounded.

    Returns (sims float32 [Nq, k], idx int64 [Nq, k]).
    """
    q, g, k = _checked_inputs(queries, gallery, k, chunk_size, "knn_search")
    dim = g.shape[1]

    if index == "flat":
        cpu_index, train = faiss.IndexFlatIP(dim), None
    elif index == "ivf":
        cpu_index, train = _ivf_index(g, nlist, train_size, "knn_search")
        cpu_index.nprobe = max(1, min(int(nprobe), cpu_index.nlist))
    else:
        raise ValueError(f"knn_search: index must be 'flat' or 'ivf', got {index!r}")

    n_q = q.shape[0]
    sims = np.empty((n_q, k), dtype=np.float32)
    idx = np.empty((n_q, k), dtype=np.int64)
    use_gpu = _use_gpu(device) and k <= GPU_MAX_K
    if index == "flat" and not use_gpu:
        # Brute force straight from the caller's array, results written in place: the same
        # routine IndexFlatIP.search runs, without first copying the gallery into an index.
        for start in range(0, n_q, chunk_size):
            stop = min(start + chunk_size, n_q)
            faiss.knn_inner_product(
                faiss.swig_ptr(q[start:stop]), faiss.swig_ptr(g), dim, stop - start,
                g.shape[0], k, faiss.swig_ptr(sims[start:stop]), faiss.swig_ptr(idx[start:stop]),
            )  # fmt: skip
    else:
        search_index = cpu_index
        if use_gpu:
            resources = faiss.StandardGpuResources()
            search_index = faiss.index_cpu_to_gpu(resources, 0, cpu_index)
        if index == "ivf":
            search_index.train(train)
            if hasattr(search_index, "nprobe"):
                search_index.nprobe = cpu_index.nprobe
        search_index.add(g)
        _search_chunks(search_index, q, k, chunk_size, sims, idx)
    # FAISS marks "not found" with -1 and the lowest float; make that an explicit -inf.
    sims[idx < 0] = -np.inf
    return sims, idx


def _checked_inputs(queries, gallery, k, chunk_size, caller: str):
    """float32 [N, D] queries and gallery, and k capped at the gallery size; clear errors."""
    q = as_float32_matrix(queries, "queries")
    g = as_float32_matrix(gallery, "gallery")
    if g.shape[0] == 0:
        raise ValueError(f"{caller}: empty gallery")
    if q.shape[0] == 0:
        raise ValueError(f"{caller}: no queries")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"{caller}: dim mismatch, queries {q.shape[1]} vs gallery {g.shape[1]}")
    if int(k) < 1:
        raise ValueError(f"{caller}: k must be >= 1, got {k}")
    if chunk_size < 1:
        raise ValueError(f"{caller}: chunk_size must be >= 1, got {chunk_size}")
    return q, g, min(int(k), g.shape[0])


def _ivf_index(g: np.ndarray, nlist: int | None, train_size: int | None, caller: str):
    """An untrained inner-product `IndexIVFFlat` for gallery `g` and the rows to train it on."""
    dim = g.shape[1]
    cells = default_nlist(g.shape[0]) if nlist is None else min(int(nlist), g.shape[0])
    if cells < 1:
        raise ValueError(f"{caller}: nlist must be >= 1, got {nlist}")
    quantizer = faiss.IndexFlatIP(dim)
    cpu_index = faiss.IndexIVFFlat(quantizer, dim, cells, faiss.METRIC_INNER_PRODUCT)
    train = g
    if train_size is not None:
        if int(train_size) < cells:
            raise ValueError(f"{caller}: train_size {train_size} < nlist {cells}")
        if train_size < g.shape[0]:
            rows = np.random.default_rng(0).choice(g.shape[0], int(train_size), replace=False)
            train = g[np.sort(rows)]
        # A sample chosen on purpose: no FAISS warning about too few points per cell.
        cpu_index.cp.min_points_per_centroid = min(39, train.shape[0] // cells)
    return cpu_index, train


def _search_chunks(index, q, k, chunk_size, sims, idx) -> None:
    """Search `q` in `chunk_size` rows at a time, writing into `sims` / `idx`."""
    for start in range(0, q.shape[0], chunk_size):
        stop = min(start + chunk_size, q.shape[0])
        sims[start:stop], idx[start:stop] = index.search(q[start:stop], k)


# Slack on "as similar as the k-th exact neighbour": float32 rounding differs between the flat
# search and an approximate index's own distance code.
RECALL_TIE_TOL = 1e-5
HNSW_M = 32  # links per node: FAISS's usual choice for 0.99 recall at moderate memory


def sample_recall(sims: np.ndarray, idx: np.ndarray, exact_sims: np.ndarray) -> float:
    """Mean recall@k of approximate results against the exact top-k of the same queries.

    A result counts when it is as similar as the exact k-th neighbour, so neighbours tied at
    the k-th place (duplicates) count whichever of them an index returns.
    """
    kth = exact_sims[:, -1:] - RECALL_TIE_TOL
    hits = (sims >= kth) & (idx >= 0)
    return float(hits.sum(axis=1).mean() / exact_sims.shape[1])


def tuned_search(
    queries: Any,
    gallery: Any,
    k: int,
    *,
    index: str = "ivf",
    target_recall: float = 0.99,
    sample: int = 1000,
    seed: int = 0,
    nlist: int | None = None,
    train_size: int | None = None,
    device: str = "auto",
    chunk_size: int = 65536,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Approximate top-k by inner product, its search parameter raised until a random sample of
    `sample` queries reaches `target_recall` of the exact (flat) top-k.

    index="ivf": `IndexIVFFlat` (nlist ~4 sqrt N, trained on the gallery), nprobe 1, 2, 4, ...
    up to nlist (then exact). index="hnsw": `IndexHNSWFlat`, M = 32, inner product (CPU only),
    efSearch k, 2k, 4k, ... up to the gallery size. If the largest value still misses the
    target a warning says so and that value is used. One flat search of the sample is the
    price of knowing the recall; it is small next to the approximate build at large N.

    Returns (sims [Nq, k], idx [Nq, k], info) as `knn_search`, with info = {"index", "param",
    "value", "recall"}: the setting used and the sample recall it reached.
    """
    q, g, k = _checked_inputs(queries, gallery, k, chunk_size, "tuned_search")
    if index not in ("ivf", "hnsw"):
        raise ValueError(f"tuned_search: index must be 'ivf' or 'hnsw', got {index!r}")
    if not 0.0 < float(target_recall) <= 1.0:
        raise ValueError(f"tuned_search: target_recall must be in (0, 1], got {target_recall}")
    if int(sample) < 1:
        raise ValueError(f"tuned_search: sample must be >= 1, got {sample}")
    rows = np.random.default_rng(seed).choice(q.shape[0], min(int(sample), q.shape[0]), False)
    q_sample = q[np.sort(rows)]
    exact_sims, _ = knn_search(q_sample, g, k, device=device, chunk_size=chunk_size)

    # `resources` keeps a GPU index's memory alive until the search is done.
    search_index, param, values, resources = _approx_index(g, index, nlist, train_size, device, k)
    for value in values:
        _set_param(search_index, index, value)
        sims, idx = search_index.search(q_sample, k)
        recall = sample_recall(sims, idx, exact_sims)
        if recall >= target_recall:
            break
    else:
        warnings.warn(
            f"tuned_search: {index} reached recall {recall:.4f} < target {target_recall} at the "
            f"largest {param}={value}"
            + (" (all cells: exact up to ties)" if index == "ivf" else ""),
            stacklevel=2,
        )
    sims = np.empty((q.shape[0], k), dtype=np.float32)
    idx = np.empty((q.shape[0], k), dtype=np.int64)
    _search_chunks(search_index, q, k, chunk_size, sims, idx)
    sims[idx < 0] = -np.inf
    return sims, idx, {"index": index, "param": param, "value": value, "recall": recall}


def _doublings(start: int, stop: int) -> list[int]:
    """start, 2 start, 4 start, ... below stop, then stop."""
    values = []
    while start < stop:
        values.append(start)
        start *= 2
    return values + [stop]


def _approx_index(g, index, nlist, train_size, device, k):
    """(index holding `g`, its search parameter's name, the values to try, GPU resources)."""
    if index == "hnsw":
        hnsw = faiss.IndexHNSWFlat(g.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        hnsw.add(g)
        return hnsw, "efSearch", _doublings(k, max(k, g.shape[0])), None
    cpu_index, train = _ivf_index(g, nlist, train_size, "tuned_search")
    search_index, resources, values = cpu_index, None, _doublings(1, cpu_index.nlist)
    if _use_gpu(device) and k <= GPU_MAX_K:
        resources = faiss.StandardGpuResources()
        search_index = faiss.index_cpu_to_gpu(resources, 0, cpu_index)
        values = sorted({min(v, GPU_MAX_K) for v in values})  # GPU IVF's nprobe limit
    search_index.train(train)
    search_index.add(g)
    return search_index, "nprobe", values, resources


def _set_param(search_index, index: str, value: int) -> None:
    if index == "ivf":
        search_index.nprobe = value
    else:
        search_index.hnsw.efSearch = value


def eval_search(
    queries: Any,
    gallery: Any,
    k: int,
    *,
    index: str = "flat",
    target_recall: float | None = None,
    nprobe: int = 16,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """The evaluators' search: (sims, idx, info). Flat, or IVF with a fixed `nprobe` when
    `target_recall` is None, is `knn_search` (info None); otherwise `tuned_search` of `index`
    to `target_recall` (nprobe unused). `kwargs` (nlist, train_size, device, chunk_size) go on.
    """
    if index == "flat" or (index == "ivf" and target_recall is None):
        return (*knn_search(queries, gallery, k, index=index, nprobe=nprobe, **kwargs), None)
    if index not in ("ivf", "hnsw"):
        raise ValueError(f"index must be 'flat', 'ivf' or 'hnsw', got {index!r}")
    if target_recall is None:
        raise ValueError("index='hnsw' needs a target_recall (its efSearch is tuned to it)")
    return tuned_search(queries, gallery, k, index=index, target_recall=target_recall, **kwargs)
