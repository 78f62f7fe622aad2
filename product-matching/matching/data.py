"""Postings (CSV + image folder) -> image store -> fold-based train / validation split.

With no `csv_path`, the embedded synthetic products set is first written out as
`postings.csv` + `images/` in the Shopee format, so the default run reads files through
exactly the path a real user's data takes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from matching.folds import load_or_make_folds
from shared.data.datamodule import StoreDataModule
from shared.data.sources import DEFAULT_BACKGROUND, CsvSource, check_background

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("posting_id", "image", "label_group")


class PostingsCsvSource(CsvSource):
    """Shopee-format postings; its settings are `data.*` in this pipeline (not `data.source`)."""

    config_key = "data"


def synthetic_postings(root: str | Path, spec: dict) -> Path:
    """Write (once) the synthetic products as a Shopee-style CSV + images; return the CSV.

    Each spec gets its own folder `<root>/<hash of spec>/`, so changing sizes never clashes.
    """
    from shared.data.synthetic import SyntheticProducts, write_image_folder_csv

    products = SyntheticProducts(**spec)
    key = hashlib.sha1(json.dumps(asdict(products.spec), sort_keys=True).encode()).hexdigest()
    return write_image_folder_csv(products, Path(root) / key[:10])


class ProductsDataModule(StoreDataModule):
    """Validate on fold `fold` (checkpoint and threshold are chosen there), test on fold
    `test_fold` (default: the next one), train on the others. Folds are group-disjoint, so
    the test groups are never seen in training nor used for any choice."""

    VAL_LOADERS = ("fold",)

    def __init__(
        self,
        store_root: str,
        csv_path: str | None = None,
        image_dir: str | None = None,
        synthetic: dict | None = None,
        synthetic_dir: str | None = None,
        fold: int = 0,
        n_folds: int = 5,
        test_fold: int | None = None,
        skip_corrupt: bool = False,
        background: Sequence[int] = DEFAULT_BACKGROUND,
        **kwargs,
    ) -> None:
        super().__init__(source=None, store_root=store_root, **kwargs)
        self.background = check_background(background, "data.background")
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
        if csv_path is None and not synthetic:
            raise ValueError("set data.csv_path (your postings CSV) or data.synthetic")
        self.csv_path, self.image_dir = csv_path, image_dir
        self.synthetic, self.synthetic_dir = dict(synthetic or {}), synthetic_dir
        self.fold, self.test_fold, self.n_folds = fold, test_fold, n_folds
        self.skip_corrupt = skip_corrupt
        self.folds: np.ndarray | None = None

    def _source(self) -> PostingsCsvSource:
        if self.source is None:
            csv, image_dir = self.csv_path, self.image_dir
            if csv is None:
                out = Path(self.synthetic_dir or Path(self.store_root) / "synthetic_postings")
                csv = synthetic_postings(out, self.synthetic)
                image_dir = Path(csv).parent / "images"
            self.source = PostingsCsvSource(
                str(csv),
                image_dir,
                image_col="image",
                label_col="label_group",
                id_col="posting_id",
                skip_corrupt=self.skip_corrupt,
                background=self.background,
            )
        return self.source

    def _build(self):
        self._source()
        return super()._build()

    def make_splits(self):
        frame = self.source.frame
        if self.store.meta.get("num_skipped"):
            frame = frame.set_index("posting_id").loc[self.store.ids].reset_index()
        self.folds = load_or_make_folds(
            frame, self.store.path / f"folds{self.n_folds}.json", self.n_folds
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

    @property
    def postings(self):
        """The CSV rows in store order (posting_id, image, label_group, ...)."""
        self.setup()
        return self.source.frame.set_index("posting_id").loc[self.store.ids].reset_index()

    def val_dataloader(self):
        return [self.query_dataloader("val")]

    def test_dataloader(self):
        return [self.query_dataloader("test")]
