"""Any image source (postings by default) -> image store -> group-disjoint folds.

The folds keep together what must not be split: a class (`label_group` of postings) and a
group of the source (`image_phash`: the same picture posted twice). A source without
groups (class folders, a CSV without group_col, synthetic) is split by its labels alone.
"""

from __future__ import annotations

import numpy as np

from matching.folds import load_or_make_folds
from shared.data.datamodule import StoreDataModule
from shared.data.object_store import local_folder
from shared.data.sources import UNLABELLED

# data=products keys that moved to data.source (data/source=postings) in issue #16.
MOVED_KEYS = ("csv_path", "image_dir", "skip_corrupt", "background", "synthetic", "synthetic_dir")


def refuse_moved_keys(overrides: list[str]) -> None:
    """SystemExit naming the new key for a command line that sets a moved `data.<key>`."""
    for arg in overrides:
        key = arg.split("=", 1)[0].lstrip("+~")
        for old in MOVED_KEYS:
            if key == f"data.{old}" or key.startswith(f"data.{old}."):
                raise SystemExit(moved_message(key))


def moved_message(key: str) -> str:
    new = key.replace("data.", "data.source.", 1)
    return (
        f"{key} has moved: product postings are a data source now, so write {new}=... "
        "(data/source=postings is the default of data=products)"
    )


class ProductsDataModule(StoreDataModule):
    """Validate on fold `fold` (checkpoint and threshold are chosen there), test on fold
    `test_fold` (default: the next one), train on the others. Folds are group-disjoint, so
    the test groups are never seen in training nor used for any choice."""

    VAL_LOADERS = ("fold",)

    def __init__(
        self,
        source,
        store_root: str,
        fold: int = 0,
        n_folds: int = 5,
        test_fold: int | None = None,
        split_by: str = "fold",
        val_fraction: float | None = None,
        test_fraction: float | None = None,
        **kwargs,
    ) -> None:
        for key in MOVED_KEYS:
            if key in kwargs:
                raise ValueError(moved_message(f"data.{key}"))
        for key, value in (("split_by", split_by), ("val_fraction", val_fraction),
                           ("test_fraction", test_fraction)):  # fmt: skip
            if value not in ("fold", None):
                raise ValueError(
                    f"data.{key}={value!r} does not apply to product matching: it validates on "
                    "fold data.fold and tests on data.test_fold of data.n_folds folds"
                )
        super().__init__(source, store_root, split_by=split_by, **kwargs)
        if not 0 <= fold < n_folds:
            raise ValueError(
                f"data.fold={fold} is out of range: n_folds={n_folds} "
                f"(valid folds 0..{n_folds - 1})"
            )
        test_fold = (fold + 1) % n_folds if test_fold is None else test_fold
        if not 0 <= test_fold < n_folds or test_fold == fold:
            raise ValueError(
                f"data.test_fold={test_fold} must be a fold in 0..{n_folds - 1} other than "
                f"data.fold={fold} (the validation fold)"
            )
        self.fold, self.test_fold, self.n_folds = fold, test_fold, n_folds
        self.folds: np.ndarray | None = None

    def make_splits(self):
        unlabelled = int((self.store.labels == UNLABELLED).sum())
        if unlabelled:
            raise ValueError(
                f"{unlabelled} of {len(self.store)} postings have an empty label cell: product "
                "matching trains and scores on labelled groups only (unlabelled images are "
                "for DINO pretraining, README: From an unlabeled catalog to a matcher)"
            )
        self.folds = load_or_make_folds(
            self.store.ids,
            self.store.labels.numpy(),
            self.store.groups,
            local_folder(self.store.path) / f"folds{self.n_folds}.json",
            self.n_folds,
        )
        val = np.flatnonzero(self.folds == self.fold)
        test = np.flatnonzero(self.folds == self.test_fold)
        train = np.flatnonzero((self.folds != self.fold) & (self.folds != self.test_fold))
        for name, rows in (("data.fold", val), ("data.test_fold", test), ("training", train)):
            if len(rows) == 0:
                raise ValueError(
                    f"{name} has no rows: {len(val)} validation, {len(test)} test and "
                    f"{len(train)} training rows in {self.n_folds} folds (fold={self.fold}, "
                    f"test_fold={self.test_fold})"
                )
        return train, val, test

    def eval_dataloaders(self, split: str):
        """One loader, the validation (or test) fold searched against itself."""
        return {"fold": self.query_dataloader(split)}
