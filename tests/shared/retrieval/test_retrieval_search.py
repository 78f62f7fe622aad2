"""knn_search against an exact torch reference (matmul + top-k)."""

import faiss
import numpy as np
import pytest
import torch

from shared.retrieval.search import ensure_unit_rows, knn_search, l2_normalize


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
