"""Image + title combinations against brute force: explicit loops over pairs, per-row F1."""

import numpy as np
import pytest

from shared.retrieval.combine import (
    TextCombination,
    candidate_pairs,
    combined_matches,
    sweep_pairs,
)
from shared.retrieval.text import TitleTfidf, has_title
from shared.retrieval.threshold import threshold_sweep

WORDS = "acme zorq bottle jar tin red blue green promo ori murah kettle mug".split()
THRESHOLDS = np.linspace(0.0, 1.0, 21)


def _case(n=36, groups=9, k=5, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(groups, size=n)
    centres = rng.normal(size=(groups, 8))
    image = centres[labels] + 0.9 * rng.normal(size=(n, 8))
    image = (image / np.linalg.norm(image, axis=1, keepdims=True)).astype(np.float32)
    titles = []
    for i in range(n):  # unique titles; every 7th posting has none
        words = [WORDS[(labels[i] + j) % len(WORDS)] for j in range(2)]
        words += list(rng.choice(WORDS, 2)) + [f"x{i}"]
        titles.append("" if i % 7 == 3 else " ".join(words))
    enc = TitleTfidf().fit(titles[: n // 2])
    return image, enc.transform(titles), has_title(titles), labels, k


def _reference(image, text, titled, labels, combo, k, t, tt=None):
    """Per row: candidates = own top-k lists (self counted, as a search returns it), then the
    mode's rule pair by pair; returns (mean F1, predicted sets)."""
    n = len(labels)
    t_dense = text.toarray().astype(np.float64)
    img = [[float(np.dot(image[i], image[j])) for j in range(n)] for i in range(n)]
    txt = [
        [
            float(np.dot(t_dense[i], t_dense[j])) if titled[i] and titled[j] else None
            for j in range(n)
        ]
        for i in range(n)
    ]
    w = combo.weight

    def combined(i, j):
        return img[i][j] if txt[i][j] is None else w * img[i][j] + (1 - w) * txt[i][j]

    f1s, predicted = [], []
    for i in range(n):
        if combo.mode == "concat":
            cands = sorted(range(n), key=lambda j: -combined(i, j))[:k]
        else:
            by_img = sorted(range(n), key=lambda j: -img[i][j])[:k]
            with_title = [j for j in range(n) if txt[i][j] is not None and txt[i][j] > 0]
            by_txt = sorted(with_title, key=lambda j: -txt[i][j])[:k]
            cands = set(by_img) | set(by_txt)
        pred = {i}
        for j in cands:
            if j == i:
                continue
            if combo.mode == "union":
                hit = img[i][j] >= t or (txt[i][j] is not None and txt[i][j] >= tt)
            else:
                hit = combined(i, j) >= t
            if hit:
                pred.add(j)
        truth = {j for j in range(n) if labels[j] == labels[i]}
        f1s.append(2 * len(pred & truth) / (len(pred) + len(truth)))
        predicted.append(pred)
    return float(np.mean(f1s)), predicted


@pytest.mark.parametrize(
    "combo",
    [
        TextCombination("union", text_thresholds=(0.2, 0.8, 4)),
        TextCombination("sum", weight=0.6),
        TextCombination("concat", weight=0.4),
    ],
    ids=lambda c: c.mode,
)
def test_combination_matches_brute_force(combo):
    image, text, titled, labels, k = _case()
    pairs = candidate_pairs(combo, image, text, titled, k)
    text_grid = combo.text_grid if combo.mode == "union" else [None]
    ref = np.array(
        [[_reference(image, text, titled, labels, combo, k, t, tt)[0] for t in THRESHOLDS]
         for tt in text_grid]
    )  # fmt: skip
    for row, tt in zip(ref, text_grid, strict=True):
        swept = threshold_sweep(pairs.scores(combo, tt), pairs.idx, labels, THRESHOLDS)
        np.testing.assert_allclose(swept.f1, row, atol=1e-9)
    t, tt, result = sweep_pairs(pairs, labels, combo, THRESHOLDS)
    assert np.isclose(result.best_f1, ref.max(), atol=1e-9)
    # The matches at the chosen thresholds are the brute-force predicted sets.
    ids = [f"p{i}" for i in range(len(labels))]
    got = combined_matches(pairs, ids, combo, t, tt)
    _, expected = _reference(image, text, titled, labels, combo, k, t, tt)
    assert [set(m) for m in got] == [{ids[j] for j in p} for p in expected]
    assert all(m[0] == ids[i] for i, m in enumerate(got))


def test_a_posting_without_a_title_is_matched_by_its_image_alone():
    image, text, titled, labels, k = _case()
    i = int(np.flatnonzero(~titled)[0])
    for combo in (TextCombination("sum", weight=0.3), TextCombination("concat", weight=0.3)):
        pairs = candidate_pairs(combo, image, text, titled, k)
        np.testing.assert_allclose(pairs.scores(combo)[i], pairs.image[i])
    union = candidate_pairs(TextCombination("union"), image, text, titled, k)
    assert np.all(np.isneginf(union.text[i]))


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="text.mode='avg'"):
        TextCombination("avg")
    with pytest.raises(ValueError, match="text.weight=1.5"):
        TextCombination("sum", weight=1.5)
