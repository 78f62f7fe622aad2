"""TF-IDF title embeddings: cosine of rows, vocabulary from the training titles only."""

import re

import numpy as np

from shared.retrieval.text import TitleTfidf, has_title

TRAIN = ["Acme striped bottle red/blue", "Zorq dotted jar green", "PROMO acme bottle 500ml"]


def _cos(x, i, j):
    return float((x[i] @ x[j].T).toarray()[0, 0])


def test_identical_titles_have_cosine_one_and_disjoint_ones_zero():
    enc = TitleTfidf().fit(TRAIN)
    x = enc.transform(["acme striped bottle", "ACME striped bottle", "zorq jar", "qqq"])
    assert np.isclose(_cos(x, 0, 1), 1.0, atol=1e-6)  # lowercased: the same title
    # No shared word and no shared 3-5 character gram: nothing in common.
    assert _cos(x, 0, 2) == 0.0
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    np.testing.assert_allclose(norms, [1, 1, 1, 0], atol=1e-6)  # "qqq": no known n-gram


def _reference_vocabulary(titles):
    """Word 1-2 grams (tokens of 2+ word characters) and 3-5 character grams of each
    space-padded word, built by hand."""
    out = set()
    for t in titles:
        tokens = re.findall(r"(?u)\b\w\w+\b", t.lower())
        out |= set(tokens) | {" ".join(p) for p in zip(tokens, tokens[1:])}
        for word in t.lower().split():
            padded = f" {word} "
            for n in range(3, 6):
                out |= {padded[i : i + n] for i in range(len(padded) - n + 1)}
    return out


def test_vocabulary_comes_only_from_the_training_titles():
    enc = TitleTfidf().fit(TRAIN)
    assert enc.vocabulary == _reference_vocabulary(TRAIN)
    enc.transform(["kettle kettle kettle"])  # a validation title changes nothing
    assert enc.vocabulary == _reference_vocabulary(TRAIN)
    assert not any("kett" in term for term in enc.vocabulary)


def test_state_round_trip_gives_the_same_rows():
    enc = TitleTfidf().fit(TRAIN)
    again = TitleTfidf.from_state(enc.state_dict())
    titles = ["acme bottle red", "zorq dotted", ""]
    np.testing.assert_array_equal(
        enc.transform(titles).toarray(), again.transform(titles).toarray()
    )


def test_has_title():
    assert has_title(["a", "", "  ", None]).tolist() == [True, False, False, False]
