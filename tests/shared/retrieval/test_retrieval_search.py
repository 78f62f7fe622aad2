"""knn_search against an exact torch reference (matmul + top-k)."""

import faiss
import numpy as np
import pytest
import torch

from shared.retrieval.search import (
    ensure_unit_rows,
    eval_search,
    knn_search,
    l2_normalize,
    sample_recall,
    tuned_search,
)


def clustered(n, dim, n_clusters, noise, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim))
    labels = rng.integers(0, n_clusters, n)
    x = centres[labels] + noise * rng.standard_normal((n, dim))
    return l2_normalize(x.astype(np.float32)), labels


def torch_topk(q, g, k):
    sims, idx = torch.topk(torch.as_tensor(q) @ torch.as_tensor(g).T, k, dim=1)
    return sims.numpy(), idx.numpy()


def test_l2_normalize_numpy_and_torch():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    out = l2_normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
    t = l2_normalize(torch.tensor(x, dtype=torch.float64))
    assert t.dtype == torch.float64
    np.testing.assert_allclose(t.numpy(), [[0.6, 0.8], [0.0, 0.0]])


def test_flat_search_equals_matmul_topk():
    q, _ = clustered(150, 24, 8, 1.0, seed=0)
    g, _ = clustered(700, 24, 8, 1.0, seed=1)
    sims, idx = knn_search(q, g, 10)
    ref_sims, ref_idx = torch_topk(q, g, 10)
    assert sims.dtype == np.float32 and idx.dtype == np.int64 and sims.shape == (150, 10)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)


def test_chunked_torch_input_matches_one_shot_numpy():
    q, _ = clustered(101, 16, 5, 0.5, seed=2)
    g, _ = clustered(300, 16, 5, 0.5, seed=3)
    one = knn_search(q, g, 7)
    chunked = knn_search(torch.from_numpy(q), torch.from_numpy(g), 7, chunk_size=17)
    np.testing.assert_array_equal(one[1], chunked[1])
    np.testing.assert_array_equal(one[0], chunked[0])


def test_k_is_capped_at_gallery_size():
    q, _ = clustered(5, 8, 2, 1.0, seed=4)
    g, _ = clustered(20, 8, 2, 1.0, seed=5)
    sims, idx = knn_search(q, g, 50)
    assert sims.shape == idx.shape == (5, 20)
    np.testing.assert_array_equal(np.sort(idx, axis=1), np.tile(np.arange(20), (5, 1)))


def test_ivf_recall_close_to_exact_and_exhaustive_probe_is_exact():
    g, _ = clustered(3000, 32, 20, 0.3, seed=6)
    q, _ = clustered(200, 32, 20, 0.3, seed=7)
    _, exact = knn_search(q, g, 10)
    _, approx = knn_search(q, g, 10, index="ivf", nlist=40, nprobe=8)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall > 0.9
    sims_all, every = knn_search(q, g, 10, index="ivf", nlist=40, nprobe=40)
    np.testing.assert_array_equal(every, exact)
    assert np.isfinite(sims_all).all()


def test_flat_search_is_indexflatip_bit_for_bit():
    """The CPU flat path calls FAISS's brute-force routine without building an index: the
    same kernel as IndexFlatIP.search, so the very same floats and ids (ties included)."""
    q, _ = clustered(300, 48, 6, 0.2, seed=11)
    g, _ = clustered(2500, 48, 6, 0.2, seed=12)
    g[100:110] = g[0]  # exact ties
    index = faiss.IndexFlatIP(48)
    index.add(g)
    ref_sims, ref_idx = index.search(q, 40)
    for chunk in (65536, 7):
        sims, idx = knn_search(q, g, 40, device="cpu", chunk_size=chunk)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(sims, ref_sims)


def test_ivf_trained_on_a_sample_with_every_cell_probed_equals_flat():
    g, _ = clustered(4000, 32, 20, 0.3, seed=13)
    q, _ = clustered(150, 32, 20, 0.3, seed=14)
    exact_sims, exact = knn_search(q, g, 12)
    sims, idx = knn_search(q, g, 12, index="ivf", nlist=50, nprobe=50, train_size=500)
    np.testing.assert_array_equal(idx, exact)
    np.testing.assert_allclose(sims, exact_sims, atol=1e-6)
    with pytest.raises(ValueError, match="train_size"):
        knn_search(q, g, 12, index="ivf", nlist=50, train_size=49)


def test_ensure_unit_rows_keeps_unit_rows_and_normalises_others():
    x, _ = clustered(50, 16, 3, 1.0, seed=15)
    assert ensure_unit_rows(x) is x  # already unit: searched exactly as given
    raw = 3.0 * x
    raw[4] = 0.0
    out = ensure_unit_rows(raw)
    np.testing.assert_array_equal(out, l2_normalize(raw))
    assert not np.shares_memory(out, raw)


@pytest.mark.parametrize(
    "queries, gallery, k, message",
    [
        (np.zeros((3, 4)), np.zeros((0, 4)), 1, "empty gallery"),
        (np.zeros((0, 4)), np.zeros((3, 4)), 1, "no queries"),
        (np.zeros((3, 4)), np.zeros((3, 5)), 1, "dim mismatch"),
        (np.zeros((3, 4)), np.zeros((3, 4)), 0, "k must be >= 1"),
    ],
)
def test_bad_inputs_raise(queries, gallery, k, message):
    with pytest.raises(ValueError, match=message):
        knn_search(queries, gallery, k)


def test_cuda_request_without_gpu_faiss_falls_back_to_cpu():
    if faiss.get_num_gpus() > 0:
        pytest.skip("this FAISS build has a GPU")
    q, _ = clustered(10, 8, 2, 1.0, seed=8)
    with pytest.warns(UserWarning, match="searching on CPU"):
        _, idx = knn_search(q, q, 3, device="cuda")
    np.testing.assert_array_equal(idx[:, 0], np.arange(10))


@pytest.mark.gpu
@pytest.mark.skipif(
    not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0, reason="no GPU FAISS"
)
def test_gpu_search_equals_cpu():
    q, _ = clustered(200, 32, 8, 1.0, seed=9)
    g, _ = clustered(2000, 32, 8, 1.0, seed=10)
    cpu = knn_search(q, g, 20, device="cpu")
    gpu = knn_search(q, g, 20, device="cuda")
    np.testing.assert_array_equal(cpu[1], gpu[1])
    np.testing.assert_allclose(cpu[0], gpu[0], atol=1e-5)


def brute_topk_sims(q, g, k):
    """Exact top-k similarities by numpy matmul + argsort (not FAISS)."""
    sims = q.astype(np.float64) @ g.astype(np.float64).T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, 1)


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_tuned_search_reaches_target_on_fresh_queries(index):
    # 5k x 32 gallery in 50 clusters, 4000 queries of which 400 tune the parameter: the recall
    # of all 4000 (90 % never seen by the tuning) against a brute-force top-10 without FAISS.
    g, _ = clustered(5000, 32, 50, 0.6, seed=3)
    q, _ = clustered(4000, 32, 50, 0.6, seed=4)
    target = 0.95
    sims, idx, info = tuned_search(
        q, g, 10, index=index, target_recall=target, sample=400, device="cpu"
    )
    assert info["index"] == index and info["recall"] >= target
    assert info["param"] == {"ivf": "nprobe", "hnsw": "efSearch"}[index]
    assert info["value"] > {"ivf": 1, "hnsw": 10}[index]  # the target needed tuning
    recall = sample_recall(sims, idx, brute_topk_sims(q, g, 10))
    assert recall >= target


def test_tuned_ivf_target_one_is_all_cells_and_equals_flat():
    g, _ = clustered(2000, 16, 20, 0.8, seed=6)
    q, _ = clustered(300, 16, 20, 0.8, seed=7)
    sims, idx, info = tuned_search(q, g, 5, index="ivf", nlist=30, target_recall=1.0, device="cpu")
    flat_sims, flat_idx = knn_search(q, g, 5, device="cpu")
    assert info["recall"] == 1.0
    np.testing.assert_allclose(sims, flat_sims, atol=1e-5)
    np.testing.assert_allclose(sims, brute_topk_sims(q, g, 5), atol=1e-5)
    assert (idx == flat_idx).mean() > 0.999  # only exact ties may swap
    assert info["value"] <= 30


def test_tuned_ivf_coarse_data_needs_all_cells():
    # Uniform random data has no clusters: recall 1.0 is only certain with every cell.
    rng = np.random.default_rng(8)
    g = l2_normalize(rng.standard_normal((1000, 16)).astype(np.float32))
    q = l2_normalize(rng.standard_normal((200, 16)).astype(np.float32))
    _, _, info = tuned_search(q, g, 20, index="ivf", nlist=16, target_recall=1.0, device="cpu")
    assert info["recall"] == 1.0
    assert 1 < info["value"] <= 16


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"index": "flat"}, "index"),
        ({"target_recall": 1.5}, "target_recall"),
        ({"target_recall": 0.0}, "target_recall"),
        ({"sample": 0}, "sample"),
        ({"k": 0}, "k"),
    ],
)
def test_tuned_search_bad_arguments_name_the_key(kwargs, key):
    g, _ = clustered(100, 8, 4, 0.5, seed=9)
    args = {"k": 5, **kwargs}
    with pytest.raises(ValueError, match=key):
        tuned_search(g, g, args.pop("k"), **args)


def test_eval_search_dispatch():
    g, _ = clustered(500, 8, 6, 0.5, seed=10)
    flat = knn_search(g, g, 5, device="cpu")
    sims, idx, info = eval_search(g, g, 5, index="flat", target_recall=0.99, device="cpu")
    assert info is None and np.array_equal(idx, flat[1])
    fixed = eval_search(g, g, 5, index="ivf", nlist=8, nprobe=8, device="cpu")
    assert fixed[2] is None and np.array_equal(fixed[1], flat[1])
    with pytest.raises(ValueError, match="target_recall"):
        eval_search(g, g, 5, index="hnsw", device="cpu")
    with pytest.raises(ValueError, match="index"):
        eval_search(g, g, 5, index="lsh", target_recall=0.9)
