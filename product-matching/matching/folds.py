"""Cross-validation folds for product matching: GroupKFold on `label_group`.

Two postings with the same `image_phash` are the same picture; if they sat in different
folds the validation score would leak. Groups linked by a shared phash are therefore merged
(union-find) before the folds are drawn, so both `label_group` and `image_phash` stay whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold

from shared.atomic import write_text


def linked_components(label_groups: np.ndarray, phashes: np.ndarray | None) -> np.ndarray:
    """Component id per row: rows sharing a label_group or an image_phash are connected."""
    n = len(label_groups)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    keys = [label_groups] + ([phashes] if phashes is not None else [])
    for key in keys:
        first: dict = {}
        for i, value in enumerate(key):
            j = first.setdefault(value, i)
            if j != i:
                a, b = find(i), find(j)
                if a != b:
                    parent[a] = b
    return np.array([find(i) for i in range(n)])


def make_folds(
    frame: pd.DataFrame,
    n_folds: int = 5,
    label_col: str = "label_group",
    phash_col: str | None = "image_phash",
) -> np.ndarray:
    """Fold number (0..n_folds-1) per row; groups and phash-linked groups never split."""
    if label_col not in frame.columns:
        raise ValueError(f"folds need column {label_col!r}; the CSV has {list(frame.columns)}")
    phash = frame[phash_col].to_numpy() if phash_col and phash_col in frame.columns else None
    components = linked_components(frame[label_col].to_numpy(), phash)
    n_components = len(np.unique(components))
    if n_components < n_folds:
        raise ValueError(f"{n_components} linked groups cannot fill {n_folds} folds")
    folds = np.empty(len(frame), dtype=np.int64)
    for k, (_, val) in enumerate(GroupKFold(n_splits=n_folds).split(frame, groups=components)):
        folds[val] = k
    return folds


def load_or_make_folds(
    frame: pd.DataFrame, path: str | Path, n_folds: int = 5, ids_col: str = "posting_id", **kwargs
) -> np.ndarray:
    """Folds written once as `<path>` (JSON of posting id -> fold), reused while they match."""
    path = Path(path)
    ids = frame[ids_col].astype(str).tolist()
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("n_folds") == n_folds and saved.get("ids") == ids:
            return np.asarray(saved["folds"], dtype=np.int64)
    folds = make_folds(frame, n_folds, **kwargs)
    write_text(path, json.dumps({"n_folds": n_folds, "ids": ids, "folds": folds.tolist()}))
    return folds
