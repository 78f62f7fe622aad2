"""Cross-validation folds for product matching: GroupKFold over linked rows.

Two postings with the same `image_phash` are the same picture; if they sat in different
folds the validation score would leak. Rows linked by a shared label (`label_group`) or a
shared group (`image_phash`) are therefore merged (union-find) before the folds are drawn,
so both stay whole. Without groups the labels alone decide.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupKFold

from shared.atomic import write_text


def linked_components(labels: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Component id per row: rows sharing a label or a group are connected."""
    n = len(labels)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    keys = [labels] + ([groups] if groups is not None else [])
    for key in keys:
        first: dict = {}
        for i, value in enumerate(key):
            j = first.setdefault(value, i)
            if j != i:
                a, b = find(i), find(j)
                if a != b:
                    parent[a] = b
    return np.array([find(i) for i in range(n)])


def make_folds(labels, groups=None, n_folds: int = 5) -> np.ndarray:
    """Fold number (0..n_folds-1) per row; labels and linked groups never split."""
    groups = None if groups is None else np.asarray(groups)
    components = linked_components(np.asarray(labels), groups)
    n_components = len(np.unique(components))
    if n_components < n_folds:
        raise ValueError(f"{n_components} linked groups cannot fill {n_folds} folds")
    folds = np.empty(len(components), dtype=np.int64)
    splits = GroupKFold(n_splits=n_folds).split(components, groups=components)
    for k, (_, val) in enumerate(splits):
        folds[val] = k
    return folds


def load_or_make_folds(ids, labels, groups, path: str | Path, n_folds: int = 5) -> np.ndarray:
    """Folds written once as `<path>` (JSON of row id -> fold), reused while they match."""
    path = Path(path)
    ids = [str(i) for i in ids]
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("n_folds") == n_folds and saved.get("ids") == ids:
            return np.asarray(saved["folds"], dtype=np.int64)
    folds = make_folds(labels, groups, n_folds)
    write_text(path, json.dumps({"n_folds": n_folds, "ids": ids, "folds": folds.tolist()}))
    return folds
