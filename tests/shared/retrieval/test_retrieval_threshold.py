"""Shopee threshold sweep, matches and blending against per-row Python set references."""

import numpy as np
import pytest
import torch

from shared.retrieval.search import knn_search
from shared.retrieval.threshold import (
    _ceil_to,
    matches_from_threshold,
    neighbourhood_blend,
    threshold_sweep,
)


def nearest_others(sims_row, idx_row, me, max_neighbours):
    """(sim, gallery index) of the other neighbours, best first, ties kept in column order."""
    others = [(float(s), int(j)) for s, j in zip(sims_row, idx_row, strict=True) if j >= 0]
    others = [(s, j) for s, j in others if j != me]
    return sorted(others, key=lambda p: -p[0])[:max_neighbours]


def predicted_set(sims_row, idx_row, me, t, min2, max_neighbours=50):
    others = nearest_others(sims_row, idx_row, me, max_neighbours)
    pred = {me} | {j for s, j in others if s >= t}
    if min2 is not None and pred == {me} and others and others[0][0] >= min2:
        pred.add(others[0][1])
    return pred


def brute_force_sweep(sims, idx, labels, thresholds, query_ids=None, min2=None, max_n=50):
    query_ids = range(len(sims)) if query_ids is None else query_ids
    out = {"f1": [], "precision": [], "recall": []}
    for t in thresholds:
        f1, prec, rec = [], [], []
        for row, me in enumerate(query_ids):
            truth = {j for j, y in enumerate(labels) if y == labels[me]}
            pred = predicted_set(sims[row], idx[row], me, t, min2, max_n)
            inter = len(pred & truth)
            f1.append(2 * inter / (len(pred) + len(truth)))
            prec.append(inter / len(pred))
            rec.append(inter / len(truth))
        out["f1"].append(np.mean(f1))
        out["precision"].append(np.mean(prec))
        out["recall"].append(np.mean(rec))
    return {key: np.array(v) for key, v in out.items()}


def messy_neighbours(seed, n_groups=40, k=8):
    """A real self-search over clustered embeddings (group sizes 1..7, singletons included),
    then damaged: some rows lose themselves from idx, some get -1 padding at the end."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 8, n_groups)
    sizes[:5] = 1
    labels = np.repeat(np.arange(n_groups), sizes)
    centres = rng.standard_normal((n_groups, 12))
    x = (centres[labels] + 0.8 * rng.standard_normal((len(labels), 12))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims, idx = knn_search(x, x, k)
    for row in rng.choice(len(x), 15, replace=False):  # self missing, neighbours shift left
        keep = idx[row] != row
        idx[row, : keep.sum()], sims[row, : keep.sum()] = idx[row, keep], sims[row, keep]
        idx[row, keep.sum() :] = -1
        sims[row, keep.sum() :] = -np.inf
    for row in rng.choice(len(x), 10, replace=False):  # self missing, a far item instead
        col = np.flatnonzero(idx[row] == row)
        if col.size:
            idx[row, col[0]] = (row + len(x) // 2) % len(x)
    return x, sims, idx, labels


def sweep_thresholds(sims, seed):
    """Unsorted thresholds, some exactly equal to similarities (tests the >= edge)."""
    rng = np.random.default_rng(seed)
    exact = rng.choice(sims[np.isfinite(sims)], 6, replace=False).astype(np.float64)
    return rng.permutation(np.concatenate([np.linspace(0.0, 1.0, 15), exact]))


@pytest.mark.parametrize("min2", [None, 0.3])
def test_sweep_matches_brute_force_sets(min2):
    _, sims, idx, labels = messy_neighbours(0)
    thresholds = sweep_thresholds(sims, 1)
    got = threshold_sweep(sims, idx, labels, thresholds, min2=min2)
    ref = brute_force_sweep(sims, idx, labels, thresholds, min2=min2)
    np.testing.assert_array_equal(got.thresholds, thresholds)
    for key in ("f1", "precision", "recall"):
        np.testing.assert_allclose(getattr(got, key), ref[key], rtol=0, atol=1e-12)
    assert got.best_index == int(np.argmax(ref["f1"]))
    assert got.best_f1 == pytest.approx(ref["f1"].max())
    assert got.best_threshold == thresholds[got.best_index]


def random_neighbours(seed, n=120, k=9, dtype=np.float32):
    """Neighbour lists drawn at random, not searched: similarities on a grid of 1/8 (many
    exact ties, some at the thresholds), singletons and large groups, self at any column or
    missing, -1 padding, some rows unsorted, so the cap and every tie rule are exercised."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n // 3, n)
    labels[:6] = np.arange(1000, 1006)  # singletons
    idx = np.stack([rng.choice(n, k, replace=False) for _ in range(n)])
    sims = np.sort(rng.integers(-2, 9, (n, k)) / 8, axis=1)[:, ::-1].astype(dtype)
    has_self = rng.random(n) < 0.8
    idx[has_self, rng.integers(0, k, n)[has_self]] = np.flatnonzero(has_self)
    pad = rng.random(n) < 0.2
    idx[pad, -2:], sims[pad, -2:] = -1, -np.inf
    shuffled = rng.random(n) < 0.25
    perm = np.argsort(rng.random((n, k)), axis=1)
    sims[shuffled] = np.take_along_axis(sims, perm, 1)[shuffled]
    idx[shuffled] = np.take_along_axis(idx, perm, 1)[shuffled]
    return sims, idx, labels


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("min2, max_n", [(None, 50), (0.25, 5), (0.0, 3), (0.5, 0)])
def test_sweep_matches_brute_force_with_ties_and_caps(dtype, min2, max_n):
    sims, idx, labels = random_neighbours(3, dtype=dtype)
    grid = np.arange(-2, 9) / 8  # every tie value is also a threshold, plus some between
    # ... and just above a tie value, which float32 cannot hold: must not match it
    thresholds = np.concatenate([grid, grid[:-1] + 1 / 16, grid + 1e-12, [0.3, 0.71, -0.05]])
    before = sims.copy(), idx.copy()
    got = threshold_sweep(sims, idx, labels, thresholds, min2=min2, max_neighbours=max_n)
    np.testing.assert_array_equal(sims, before[0])  # unsorted rows are sorted in a copy
    np.testing.assert_array_equal(idx, before[1])
    ref = brute_force_sweep(sims, idx, labels, thresholds, min2=min2, max_n=max_n)
    for key in ("f1", "precision", "recall"):
        np.testing.assert_allclose(getattr(got, key), ref[key], rtol=0, atol=1e-12)
    rows = np.arange(0, len(labels), 4)
    sub = threshold_sweep(
        sims[rows], idx[rows], labels, thresholds, query_ids=rows, min2=min2, max_neighbours=max_n
    )
    ref = brute_force_sweep(sims[rows], idx[rows], labels, thresholds, rows, min2, max_n)
    np.testing.assert_allclose(sub.f1, ref["f1"], rtol=0, atol=1e-12)
    ids = np.arange(len(labels))
    for t in (0.375, 0.375 + 1e-12):
        got_matches = matches_from_threshold(sims, idx, ids, t, min2, max_neighbours=max_n)
        want = [sorted(predicted_set(sims[i], idx[i], i, t, min2, max_n)) for i in range(len(ids))]
        assert [sorted(row) for row in got_matches] == want


GRIDS = {
    "many": np.concatenate([np.linspace(-0.5, 1.0, 31), [0.2, 0.2, 0.5 + 1e-12]]),
    "one": np.array([0.5]),
    "equal": np.array([0.2, 0.2, 0.2]),
    "1e-300 apart": np.array([0.5, 0.5 + 1e-300, 0.5]),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("grid", GRIDS)
def test_sweep_exact_at_extreme_similarities(dtype, grid):
    """Similarities on, just around, and far outside the thresholds (inf, the dtype's max and
    min, signed zeros), also for grids with no spread: every threshold's scores must equal
    the float64 definition's."""
    rng = np.random.default_rng(12)
    finfo = np.finfo(dtype)
    n, k = 60, 12
    labels = rng.integers(0, 15, n)
    thresholds = GRIDS[grid]
    near = _ceil_to(thresholds, dtype)
    pool = np.concatenate([
        near, np.nextafter(near, dtype(-np.inf)), np.nextafter(near, dtype(np.inf)),
        [-np.inf, np.inf, finfo.max, finfo.min, 0.0, -0.0, finfo.tiny, -finfo.tiny],
        rng.uniform(-1.2, 1.2, 40),
    ]).astype(dtype)  # fmt: skip
    sims = np.sort(rng.choice(pool, (n, k)), axis=1)[:, ::-1].copy()
    idx = np.stack([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    got = threshold_sweep(sims, idx, labels, thresholds, min2=0.1)
    ref = brute_force_sweep(sims, idx, labels, thresholds, min2=0.1)
    for key in ("f1", "precision", "recall"):
        np.testing.assert_allclose(getattr(got, key), ref[key], rtol=0, atol=1e-12)


@pytest.mark.parametrize("rows", [1, 7])
def test_sweep_in_row_blocks_equals_the_brute_force(monkeypatch, rows):
    """Blocks of rows (as a large fold is swept) add up to the brute force; a NaN in the last
    block still raises."""
    import shared.retrieval.threshold as T

    monkeypatch.setattr(T, "_SWEEP_ROWS", rows)
    sims, idx, labels = random_neighbours(7)
    thresholds = np.linspace(-0.25, 1.0, 21)
    got = threshold_sweep(sims, idx, labels, thresholds, min2=0.25)
    ref = brute_force_sweep(sims, idx, labels, thresholds, min2=0.25)
    for key in ("f1", "precision", "recall"):
        np.testing.assert_allclose(getattr(got, key), ref[key], rtol=0, atol=1e-12)
    bad = sims.copy()
    bad[-1, :] = np.nan  # the last block only
    bad_idx = idx.copy()
    bad_idx[-1, :] = (np.arange(len(labels))[-1] + 1) % len(labels)  # valid, not itself
    with pytest.raises(ValueError, match="NaN"):
        threshold_sweep(bad, bad_idx, labels, thresholds)


def test_nan_in_an_unsorted_row_raises_even_past_the_cap():
    """A NaN candidate ranks nowhere: it must raise, not be skipped by the max_neighbours
    cap or the below-every-threshold stop."""
    sims = np.array([[0.9, 0.1, np.nan, 0.95], [0.8, 0.7, 0.6, 0.5]], np.float32)
    idx = np.array([[1, 2, 3, 0], [0, 2, 3, 1]])
    for max_n in (1, 3):
        with pytest.raises(ValueError, match="NaN"):
            threshold_sweep(sims, idx, [0, 0, 1, 1], [0.5], query_ids=[0, 1], max_neighbours=max_n)


def test_nan_similarity_raises():
    _, sims, idx, labels = messy_neighbours(0)
    sims[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        threshold_sweep(sims, idx, labels, [0.5])


def test_plain_and_copied_rows_give_identical_scores():
    """One -1 column appended to a plain FAISS search (what FAISS pads with when it finds
    fewer than k) changes no candidate, so no sum either."""
    x, _, _, labels = messy_neighbours(6)
    sims, idx = knn_search(x, x, 8)
    padded_sims = np.concatenate([sims, np.full((len(sims), 1), -np.inf, np.float32)], 1)
    padded_idx = np.concatenate([idx, np.full((len(idx), 1), -1)], 1)
    thresholds = np.linspace(0.0, 1.0, 40)
    for min2, max_n in ((None, 50), (0.3, 4), (0.8, 50), (0.6, 0)):
        plain = threshold_sweep(sims, idx, labels, thresholds, min2=min2, max_neighbours=max_n)
        copied = threshold_sweep(
            padded_sims, padded_idx, labels, thresholds, min2=min2, max_neighbours=max_n
        )
        ref = brute_force_sweep(sims, idx, labels, thresholds, min2=min2, max_n=max_n)
        for key in ("f1", "precision", "recall"):
            np.testing.assert_array_equal(getattr(plain, key), getattr(copied, key))
            np.testing.assert_allclose(getattr(plain, key), ref[key], rtol=0, atol=1e-12)


def random_sweep_case(rng):
    """One random sweep problem: a real self-search (sometimes with tied or duplicate
    vectors, float64 sims, -1 holes, a rotated row), thresholds from a grid, from the sims
    themselves, nearly equal pairs or anywhere, any min2, cap and query subset."""
    n, d = int(rng.integers(2, 40)), int(rng.integers(2, 8))
    k = int(rng.integers(1, min(n, 12) + 1))
    labels = rng.integers(0, max(1, n // int(rng.integers(1, 5))), n)
    x = rng.standard_normal((n, d)).astype(np.float32)
    if rng.random() < 0.3:
        x = np.round(x, 1)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-9
    sims, idx = knn_search(x, x, k)
    if rng.random() < 0.2:
        sims = sims.astype(np.float64)
    if rng.random() < 0.2:
        for r in rng.choice(n, min(n, 3), replace=False):
            c = rng.integers(0, k)
            idx[r, c], sims[r, c] = -1, -np.inf
    if rng.random() < 0.2:
        r = rng.integers(0, n)
        idx[r], sims[r] = np.roll(idx[r], 1), np.roll(sims[r], 1)
    finite = sims[np.isfinite(sims)]
    thresholds = [
        np.linspace(-1, 1, int(rng.integers(1, 60))),
        rng.choice(finite, int(rng.integers(1, 10))) if finite.size else np.array([0.5]),
        np.concatenate([np.linspace(0, 1, 11), [0.5 + 1e-9, 0.5]]),
        rng.uniform(-1.2, 1.2, int(rng.integers(1, 30))),
    ][rng.integers(0, 4)].astype(np.float64)
    min2 = None if rng.random() < 0.5 else float(rng.uniform(-0.5, 1))
    rows = np.arange(n)
    if rng.random() < 0.3:
        rows = np.sort(rng.choice(n, int(rng.integers(1, n + 1)), replace=False))
    return sims[rows], idx[rows], labels, thresholds, rows, min2, int(rng.integers(0, 14))


def test_sweep_matches_brute_force_on_random_cases():
    rng = np.random.default_rng(123)
    for _ in range(100):
        sims, idx, labels, thresholds, rows, min2, max_n = random_sweep_case(rng)
        got = threshold_sweep(
            sims, idx, labels, thresholds, query_ids=rows, min2=min2, max_neighbours=max_n
        )
        ref = brute_force_sweep(sims, idx, labels, thresholds, rows, min2, max_n)
        for key in ("f1", "precision", "recall"):
            np.testing.assert_allclose(getattr(got, key), ref[key], rtol=0, atol=1e-12)


@pytest.mark.parametrize("column", [1, 5])
@pytest.mark.parametrize("pad", [False, True])
def test_neighbour_index_out_of_range_raises(column, pad):
    """Past the gallery in a plain row or a copied one (-1 padding), anywhere in the row."""
    x, _, _, labels = messy_neighbours(7)
    sims, idx = knn_search(x, x, 8)
    if pad:
        idx[:, -1] = -1
    idx[4, column] = len(labels)
    with pytest.raises(ValueError, match="out of range"):
        threshold_sweep(sims, idx, labels, np.linspace(0, 1, 30))


def test_min2_changes_the_answer_on_this_data():
    _, sims, idx, labels = messy_neighbours(0)
    plain = threshold_sweep(sims, idx, labels, [0.9])
    loose = threshold_sweep(sims, idx, labels, [0.9], min2=0.3)
    assert loose.recall[0] > plain.recall[0]


def test_sweep_with_query_subset_and_neighbour_cap():
    _, sims, idx, labels = messy_neighbours(2)
    rows = np.arange(0, len(labels), 3)
    thresholds = sweep_thresholds(sims, 3)
    got = threshold_sweep(
        sims[rows], idx[rows], labels, thresholds, query_ids=rows, min2=0.2, max_neighbours=3
    )
    ref = brute_force_sweep(sims[rows], idx[rows], labels, thresholds, rows, 0.2, max_n=3)
    for key in ("f1", "precision", "recall"):
        np.testing.assert_allclose(getattr(got, key), ref[key], rtol=0, atol=1e-12)


def test_unsorted_neighbour_columns_give_the_same_answer():
    _, sims, idx, labels = messy_neighbours(9)
    perm = np.argsort(np.random.default_rng(10).random(sims.shape), axis=1)
    shuffled_sims, shuffled_idx = (
        np.take_along_axis(sims, perm, 1),
        np.take_along_axis(idx, perm, 1),
    )
    thresholds = sweep_thresholds(sims, 11)
    got = threshold_sweep(
        shuffled_sims, shuffled_idx, labels, thresholds, min2=0.3, max_neighbours=3
    )
    ref = brute_force_sweep(sims, idx, labels, thresholds, min2=0.3, max_n=3)
    np.testing.assert_allclose(got.f1, ref["f1"], rtol=0, atol=1e-12)
    ids = np.arange(len(labels)) + 1000
    for t in (0.4, 0.8):
        a = matches_from_threshold(shuffled_sims, shuffled_idx, ids, t, 0.3, max_neighbours=3)
        b = matches_from_threshold(sims, idx, ids, t, 0.3, max_neighbours=3)
        assert a == b


def test_sweep_accepts_torch_and_string_labels():
    _, sims, idx, labels = messy_neighbours(4)
    names = np.array([f"group-{y}" for y in labels])
    a = threshold_sweep(torch.from_numpy(sims), torch.from_numpy(idx), names, [0.5, 0.7])
    b = threshold_sweep(sims, idx, torch.from_numpy(labels), np.array([0.5, 0.7]))
    np.testing.assert_array_equal(a.f1, b.f1)
    # Sparse, huge and negative integer labels name the same groups: same scores, whether
    # they are counted directly or go through np.unique.
    for relabelled in (labels * 7 + 3, labels * 10**12 - 5, -1 - labels, labels.astype(np.uint8)):
        c = threshold_sweep(sims, idx, relabelled, np.array([0.5, 0.7]))
        np.testing.assert_array_equal(c.f1, b.f1)
        np.testing.assert_array_equal(c.recall, b.recall)


def test_empty_fold_raises():
    with pytest.raises(ValueError, match="empty validation fold"):
        threshold_sweep(np.zeros((0, 5)), np.zeros((0, 5), dtype=np.int64), [], [0.5])


@pytest.mark.parametrize("min2", [None, 0.25])
def test_matches_score_the_sweep_f1(min2):
    _, sims, idx, labels = messy_neighbours(5)
    ids = np.array([f"posting_{i}" for i in range(len(labels))])
    thresholds = np.array([0.2, 0.55, 0.8])
    sweep = threshold_sweep(sims, idx, labels, thresholds, min2=min2)
    group = {pid: y for pid, y in zip(ids, labels, strict=True)}
    for t, sweep_f1 in zip(thresholds, sweep.f1, strict=True):
        matches = matches_from_threshold(sims, idx, ids, t, min2=min2)
        assert len(matches) == len(ids)
        f1 = []
        for pid, row in zip(ids, matches, strict=True):
            assert row[0] == pid and len(row) == len(set(row)) <= 51
            truth = {other for other in ids if group[other] == group[pid]}
            f1.append(2 * len(set(row) & truth) / (len(row) + len(truth)))
        assert np.mean(f1) == pytest.approx(sweep_f1, abs=1e-12)


def brute_force_blend(x, sims, idx, k, threshold):
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(len(x)):
        others = nearest_others(sims[i], idx[i], i, len(idx[i]) if k is None else k)
        v = float(x[i] @ x[i]) * x[i].astype(np.float64)
        for s, j in others:
            if threshold is None or s >= threshold:
                v += max(s, 0.0) * x[j]
        out[i] = v / np.linalg.norm(v)
    return out


@pytest.mark.parametrize("k, threshold", [(None, None), (3, None), (None, 0.5), (2, 0.4)])
def test_blend_matches_loop(k, threshold):
    x, sims, idx, _ = messy_neighbours(6)
    got = neighbourhood_blend(x, sims, idx, k=k, threshold=threshold, chunk_size=50)
    np.testing.assert_allclose(got, brute_force_blend(x, sims, idx, k, threshold), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_blend_keeps_torch():
    x, sims, idx, _ = messy_neighbours(7)
    got = neighbourhood_blend(torch.from_numpy(x), sims, idx, k=3)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), neighbourhood_blend(x, sims, idx, k=3))
