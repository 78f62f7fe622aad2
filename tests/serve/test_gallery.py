"""The gallery against brute-force numpy: search, the match rule, its store, concurrent use."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from matching.service.gallery import (
    DuplicatePostingError,
    Gallery,
    GalleryStore,
    Posting,
    select_matches,
)
from matching.service.titles import TitleRule, title_matches
from shared.retrieval.combine import candidate_pairs, combined_matches
from shared.retrieval.search import knn_search
from shared.retrieval.text import TitleTfidf, has_title
from shared.retrieval.threshold import matches_from_threshold


def unit(rng, n, d=16):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def postings(start, n):
    return [Posting(f"p{i}", f"g{i % 5}", None, f"/img/{i}.png") for i in range(start, start + n)]


def filled(n=200, d=16, seed=0):
    rng = np.random.default_rng(seed)
    x = unit(rng, n, d)
    gallery = Gallery(d, "key")
    assert gallery.add(x, postings(0, n)) == n
    return gallery, x, rng


def test_search_is_the_brute_force_cosine_ranking():
    gallery, x, rng = filled()
    q = unit(rng, 7)
    hits = gallery.search(q * 3.0, k=15)  # not normalised: the gallery normalises queries
    sims = q @ x.T
    for row, h in zip(sims, hits):
        order = np.argsort(-row, kind="stable")[:15]
        assert [p.posting.posting_id for p in h] == [f"p{i}" for i in order]
        np.testing.assert_allclose([p.similarity for p in h], row[order], atol=1e-5)
    assert len(gallery.search(q, k=1000)[0]) == 200  # k is capped at the gallery size


def test_select_matches_is_the_set_rule():
    rng = np.random.default_rng(1)
    for _ in range(200):
        sims = np.sort(rng.uniform(-1, 1, size=rng.integers(0, 70)))[::-1]
        t, min2 = rng.uniform(-0.5, 1), rng.choice([None, rng.uniform(-1, 1)])
        expected = {i for i in range(min(50, len(sims))) if sims[i] >= t}
        if not expected and min2 is not None and len(sims) and sims[0] >= min2:
            expected = {0}
        assert set(select_matches(sims, t, min2).tolist()) == expected


def test_select_matches_agrees_with_the_runs_evaluation_rule():
    """A gallery item queried against the others matches what matches.csv would list."""
    gallery, x, _ = filled(120, seed=3)
    ids = np.array([f"p{i}" for i in range(120)])
    sims, idx = knn_search(x, x, 51)
    for t, min2 in ((0.3, None), (0.45, 0.2), (0.9, 0.3)):
        reference = matches_from_threshold(sims, idx, ids, t, min2)
        for i in range(0, 120, 7):
            other = gallery_without(x, i)
            hits = other.search(x[i : i + 1], k=50)[0]
            chosen = select_matches([h.similarity for h in hits], t, min2)
            got = [hits[j].posting.posting_id for j in chosen]
            assert got == reference[i][1:]


def gallery_without(x, skip):
    keep = [i for i in range(len(x)) if i != skip]
    gallery = Gallery(x.shape[1], "key")
    gallery.add(x[keep], [Posting(f"p{i}", None, None, "") for i in keep])
    return gallery


def test_add_is_all_or_nothing_and_ids_stay_unique():
    gallery, _, rng = filled(10)
    with pytest.raises(DuplicatePostingError, match="already in the gallery"):
        gallery.add(unit(rng, 2), postings(9, 2))
    with pytest.raises(DuplicatePostingError, match="more than once"):
        gallery.add(unit(rng, 2), postings(20, 1) * 2)
    with pytest.raises(ValueError, match=r"need embeddings \[2, 16\]"):
        gallery.add(unit(rng, 3), postings(20, 2))
    assert len(gallery) == 10 and gallery.get("p20") is None
    assert gallery.add(unit(rng, 2), postings(20, 2)) == 12 and "p21" in gallery


def test_store_gives_back_every_committed_posting_in_order(tmp_path):
    """Additions committed to a GalleryStore come back, in order, after the store is closed
    and opened again; failed additions leave no row."""
    rng = np.random.default_rng(4)
    x = unit(rng, 9)
    gallery = Gallery(16, "key", GalleryStore(tmp_path / "g.sqlite"))
    gallery.add(x[:5] * 2.0, postings(0, 5))  # stored normalised, like the index
    with pytest.raises(DuplicatePostingError):
        gallery.add(unit(rng, 2), postings(4, 2))
    gallery.add(x[5:], postings(5, 4))
    gallery.close()
    back = Gallery.from_store(GalleryStore(tmp_path / "g.sqlite"), 16, "key")
    assert back.postings() == postings(0, 9)
    np.testing.assert_allclose(back.embeddings(), x, atol=1e-6)
    assert back.search(x[7:8], k=1)[0][0].posting.posting_id == "p7"
    back.close()


def test_store_refuses_a_second_process_and_ids_stay_unique(tmp_path):
    store = GalleryStore(tmp_path / "g.sqlite")
    with pytest.raises(RuntimeError, match="in use by another service process"):
        GalleryStore(tmp_path / "g.sqlite")
    rng = np.random.default_rng(5)
    store.append(unit(rng, 2), postings(0, 2))
    with pytest.raises(DuplicatePostingError):  # the table's own check, not only the gallery's
        store.append(unit(rng, 2), postings(1, 2))
    assert store.count() == 2
    store.close()
    GalleryStore(tmp_path / "g.sqlite").close()  # closed: free again


def test_failure_after_the_commit_takes_the_rows_back(tmp_path, monkeypatch):
    """An addition that cannot reach the index after its commit is removed from the store:
    never durable without being searchable."""
    rng = np.random.default_rng(6)
    gallery = Gallery(16, "key", GalleryStore(tmp_path / "g.sqlite"))
    gallery.add(unit(rng, 3), postings(0, 3))

    def broken(*args):
        raise MemoryError("index full")

    monkeypatch.setattr(gallery, "_append_in_memory", broken)
    with pytest.raises(MemoryError):
        gallery.add(unit(rng, 2), postings(3, 2))
    assert gallery.store.count() == 3 and len(gallery) == 3
    gallery.close()


def test_concurrent_adds_and_searches_stay_consistent():
    """Writers append while readers search: every hit's similarity must be the dot product
    with that posting's own vector (a torn index would pair rows and postings wrongly)."""
    d, base = 16, 100
    rng = np.random.default_rng(5)
    vectors = {f"p{i}": v for i, v in enumerate(unit(rng, base + 4 * 50, d))}
    gallery = Gallery(d, "key")
    gallery.add(np.stack([vectors[f"p{i}"] for i in range(base)]), postings(0, base))
    errors, checked = [], [0]

    def writer(w):
        for b in range(10):
            start = base + w * 50 + b * 5
            batch = postings(start, 5)
            gallery.add(np.stack([vectors[p.posting_id] for p in batch]), batch)

    def reader(r):
        q = unit(np.random.default_rng(100 + r), 20, d)
        for _ in range(30):
            for row, hits in zip(q, gallery.search(q, k=60)):
                for h in hits:
                    if abs(float(row @ vectors[h.posting.posting_id]) - h.similarity) > 1e-5:
                        errors.append(h)
                checked[0] += len(hits)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    threads += [threading.Thread(target=reader, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and checked[0] > 0
    assert len(gallery) == base + 200
    assert {p.posting_id for p in gallery.postings()} == set(vectors)
    stored = gallery.embeddings()
    for i, p in enumerate(gallery.postings()):
        np.testing.assert_allclose(stored[i], vectors[p.posting_id], atol=1e-6)


WORDS = "acme zorq bottle jar tin red blue green promo ori murah kettle mug".split()


@pytest.mark.parametrize("mode", ["union", "sum", "concat"])
def test_title_matches_are_the_evaluations(mode):
    """Each gallery posting queried with its own image and title: its matches under the
    title rule (itself among them) are the evaluation's row for it (`combined_matches`
    over the gallery searched against itself), in every mode; a title missing on either
    side falls back to the image."""
    rng = np.random.default_rng(7)
    n, labels = 60, rng.integers(15, size=60)
    centres = unit(rng, 15)
    x = centres[labels] + 0.5 * unit(rng, n)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    titles = [
        "" if i % 5 == 2 else f"{WORDS[labels[i] % 13]} {rng.choice(WORDS)} x{i % 7}"
        for i in range(n)
    ]
    tfidf = TitleTfidf().fit(titles[::2])
    rule = TitleRule(mode, 0.6, 0.55, 0.4 if mode == "union" else None, k=11)
    gallery = Gallery(16, "key", titles=tfidf)
    gallery.add(x, [Posting(f"p{i}", None, titles[i], "") for i in range(n)])

    ids = [f"p{i}" for i in range(n)]
    combo, text = rule.combination, tfidf.transform(titles)
    pairs = candidate_pairs(combo, x, text, has_title(titles), 11)
    expected = combined_matches(pairs, ids, combo, rule.threshold, rule.text_threshold)
    got = title_matches(gallery, rule, x, titles, None)
    assert [{h.posting.posting_id for h in row} for row in got] == [set(r) for r in expected]
    by_title = [h for row in got for h in row if h.title_similarity is not None]
    assert by_title and all(h.posting.title and h.title_similarity >= 0 for h in by_title)


@pytest.mark.slow
def test_a_run_on_shards_serves_the_gallery_a_memmap_run_serves(tmp_path):
    """The service builds its gallery from the run's own store, whichever kind: lossless
    shards give the memmap run's postings and embeddings."""
    from matching.service.loading import load_service
    from tests.pipelines import cli, run, run_dir
    from tests.serve.conftest import serve_config

    galleries = {}
    for kind in ("memmap", "shards"):
        out = tmp_path / kind
        result = run(cli("matching", out, f"data.store_kind={kind}", "data.shard_format=png"))
        assert result.returncode == 0, result.stderr[-3000:]
        service = load_service(serve_config(out, f"run_dir={run_dir('matching', out)}"))
        galleries[kind] = service.gallery
    memmap, shards = galleries["memmap"], galleries["shards"]
    assert [p.posting_id for p in shards.postings()] == [p.posting_id for p in memmap.postings()]
    np.testing.assert_allclose(shards.embeddings(), memmap.embeddings(), atol=1e-6)
