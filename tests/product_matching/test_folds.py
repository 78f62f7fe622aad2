"""Folds keep label groups and identical images (phash) together."""

import numpy as np
import pandas as pd
import pytest

from matching.folds import linked_components, load_or_make_folds, make_folds


def random_postings(n=400, seed=0):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 90, n)
    # Mostly unique images; about 1 in 20 re-uses the picture of another random posting.
    phash = np.array([f"h{i}" for i in range(n)])
    copies = rng.random(n) < 0.05
    phash[copies] = phash[rng.integers(0, n, copies.sum())]
    return pd.DataFrame(
        {"posting_id": [f"p{i}" for i in range(n)], "label_group": groups, "image_phash": phash}
    )


def test_components_match_brute_force_closure():
    df = random_postings(120, 1)
    comp = linked_components(df.label_group.to_numpy(), df.image_phash.to_numpy())
    # Brute force: repeatedly merge rows sharing a group or phash until nothing changes.
    label = list(range(len(df)))
    changed = True
    while changed:
        changed = False
        for i in range(len(df)):
            for j in range(len(df)):
                linked = (
                    df.label_group[i] == df.label_group[j] or df.image_phash[i] == df.image_phash[j]
                )
                if linked and label[i] != label[j]:
                    low = min(label[i], label[j])
                    label = [low if x in (label[i], label[j]) else x for x in label]
                    changed = True
    same_ours = comp[:, None] == comp[None, :]
    label = np.array(label)
    assert np.array_equal(same_ours, label[:, None] == label[None, :])


def test_folds_disjoint_by_group_and_phash():
    df = random_postings()
    folds = make_folds(df.label_group, df.image_phash, n_folds=5)
    assert set(folds) <= set(range(5))
    for col in ("label_group", "image_phash"):
        assert (df.assign(fold=folds).groupby(col).fold.nunique() == 1).all(), col


def test_folds_written_once_and_reused(tmp_path):
    df = random_postings()
    path = tmp_path / "folds5.json"
    first = load_or_make_folds(df.posting_id, df.label_group, df.image_phash, path, 5)
    mtime = path.stat().st_mtime_ns
    again = load_or_make_folds(df.posting_id, df.label_group, df.image_phash, path, 5)
    assert np.array_equal(first, again) and path.stat().st_mtime_ns == mtime
    other = load_or_make_folds(
        df.posting_id, df.label_group, df.image_phash, path, 3
    )  # another fold count: rewritten
    assert set(other) == {0, 1, 2}


def test_too_few_groups_for_folds():
    df = pd.DataFrame({"posting_id": ["a", "b"], "label_group": [1, 1], "image_phash": ["x", "y"]})
    with pytest.raises(ValueError, match="cannot fill 5 folds"):
        make_folds(df.label_group, df.image_phash, 5)
