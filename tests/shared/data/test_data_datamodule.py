"""Index splits and the store data module: what a batch holds and which rows it covers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.data.datamodule import StoreDataModule, StoreDataset, split_indices


class ArraySource:
    """An in-memory source (`shared.data.sources.Source`): image i is filled with
    (i, label, 7) so rows are recognisable."""

    def __init__(self, labels, size_hint: int = 8) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ids = [f"r{i}" for i in range(len(self.labels))]
        self.class_names = [f"c{c}" for c in range(int(self.labels.max()) + 1)]
        self.skip_corrupt = False
        self.groups = None
        self.loads = 0

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self) -> dict:
        return {"kind": "array", "labels": self.labels.tolist()}

    def corrupt_error(self, bad):
        return ValueError(f"rows {bad} failed")

    def load(self, indices, size):
        self.loads += 1
        idx = torch.as_tensor(list(indices))
        vals = torch.stack([idx, torch.as_tensor(self.labels)[idx], torch.full_like(idx, 7)], 1)
        return vals.to(torch.uint8)[:, :, None, None].expand(-1, 3, size, size).clone(), []


# 6 classes with 1..8 images: class 0 has a single image (it can only be in train).
LABELS = np.repeat(np.arange(6), [1, 2, 3, 4, 6, 8])
RNG_LABELS = np.random.default_rng(0).permutation(LABELS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_instance_split(seed):
    train, val, test = split_indices(RNG_LABELS, 0.25, "instance", seed=seed)
    assert len(test) == 0  # test_fraction 0: no test split
    assert len(np.intersect1d(train, val)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(LABELS)))
    assert set(RNG_LABELS[train]) == set(range(6))  # every class keeps a train image
    for c, n in enumerate([1, 2, 3, 4, 6, 8]):  # per class: round(0.25 n), at most n - 1
        assert (RNG_LABELS[val] == c).sum() == min(n - 1, round(0.25 * n))
    assert abs(len(val) / len(LABELS) - 0.25) < 0.1
    again = split_indices(RNG_LABELS, 0.25, "instance", seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip((train, val), again))  # deterministic


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_instance_split_with_test(seed):
    train, val, test = split_indices(RNG_LABELS, 0.25, "instance", seed=seed, test_fraction=0.25)
    parts = np.concatenate([train, val, test])
    assert np.array_equal(np.sort(parts), np.arange(len(LABELS)))  # disjoint, complete
    assert set(RNG_LABELS[train]) == set(range(6))
    for c, n in enumerate([1, 2, 3, 4, 6, 8]):  # test first, then val, train keeps one
        n_test = min(n - 1, round(0.25 * n))
        assert (RNG_LABELS[test] == c).sum() == n_test
        assert (RNG_LABELS[val] == c).sum() == min(n - 1 - n_test, round(0.25 * n))


def test_instance_split_seed_changes_rows():
    a = split_indices(RNG_LABELS, 0.5, "instance", seed=0)[1]
    b = split_indices(RNG_LABELS, 0.5, "instance", seed=1)[1]
    assert not np.array_equal(a, b)


def test_class_split():
    labels = np.repeat(np.arange(10), 3)
    train, val, test = split_indices(labels, 0.3, "class", seed=4, test_fraction=0.2)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) + len(test) == 30
    test_classes = set(labels[test])
    assert len(test_classes) == 2 and not test_classes & (set(labels[train]) | set(labels[val]))
    train_classes, val_classes = set(labels[train]), set(labels[val])
    assert not train_classes & val_classes and len(val_classes) == 3
    assert train_classes | val_classes | test_classes == set(range(10))
    assert all((labels[val] == c).sum() == 3 for c in val_classes)  # whole classes


@pytest.mark.parametrize(
    "labels, fraction, split_by",
    [
        (np.arange(5), 0.3, "instance"),  # every class a singleton: nothing can go to val
        (np.zeros(6, dtype=int), 0.3, "class"),  # one class: it goes to val, train is empty
        (np.array([0, 0, 1]), 0.01, "instance"),  # fraction too small to pick any row
    ],
)
def test_empty_split_raises(labels, fraction, split_by):
    with pytest.raises(ValueError, match="empty split") as info:
        split_indices(labels, fraction, split_by)
    msg = str(info.value)
    assert f"val_fraction={fraction}" in msg and f"split_by={split_by}" in msg


def test_bad_split_arguments():
    with pytest.raises(ValueError, match="val_fraction must be in"):
        split_indices(LABELS, 1.0)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        split_indices(LABELS, 0.0)
    with pytest.raises(ValueError, match="'instance', 'group' or 'class', got 'bogus'"):
        split_indices(LABELS, 0.2, split_by="bogus")
    with pytest.raises(ValueError, match="split_by=group needs a group per image"):
        split_indices(LABELS, 0.2, split_by="group")
    spanning = [f"g{i % 3}" for i in range(len(LABELS))]  # groups across several classes
    with pytest.raises(ValueError, match="hold images of several labels"):
        split_indices(LABELS, 0.2, split_by="group", groups=spanning)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_split_keeps_each_group_on_one_side(seed):
    """Pairs of images (an item shot twice) within each class: no pair is cut in two."""
    labels = np.repeat(np.arange(8), 10)
    groups = [f"item{i // 2}" for i in range(len(labels))]
    train, val, test = split_indices(labels, 0.2, "group", seed, 0.2, groups)
    side = np.zeros(len(labels), int)
    side[val], side[test] = 1, 2
    for g in set(groups):
        rows = [i for i, x in enumerate(groups) if x == g]
        assert len(set(side[rows])) == 1, g
    assert set(labels[train]) == set(range(8))  # every class keeps training images
    for c in range(8):  # 10 images per class: 2 val, 2 test (whole pairs hit the quotas)
        assert (labels[val] == c).sum() == 2 and (labels[test] == c).sum() == 2
    # the same draw as the instance split when every image is its own group
    singles = [str(i) for i in range(len(labels))]
    alone = split_indices(labels, 0.2, "group", seed, 0.2, singles)
    assert all(
        len(a) == len(b) for a, b in zip(alone, split_indices(labels, 0.2, "instance", seed, 0.2))
    )
    with pytest.raises(ValueError, match="test_fraction must be in"):
        split_indices(LABELS, 0.2, test_fraction=-0.1)
    with pytest.raises(ValueError, match="must be below 1"):
        split_indices(LABELS, 0.5, test_fraction=0.5)


@pytest.fixture
def dm(tmp_path) -> StoreDataModule:
    dm = StoreDataModule(
        ArraySource(RNG_LABELS),
        str(tmp_path / "stores"),
        image_size=4,
        batch_size=5,
        eval_batch_size=7,
        val_fraction=0.25,
        test_fraction=0.25,
        seed=3,
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _check_batch(dm, batch, size=4):
    imgs, labels, index = batch["images"], batch["labels"], batch["index"]
    assert set(batch) == {"images", "labels", "index"}
    assert imgs.dtype == torch.uint8 and imgs.shape == (len(index), 3, size, size)
    assert labels.dtype == torch.int64 and index.dtype == torch.int64
    assert torch.equal(imgs, dm.store.images[index])
    assert torch.equal(labels, dm.store.labels[index])
    # The bytes carry their row and label: batch, store and source agree.
    assert torch.equal(imgs[:, 0, 0, 0].long(), index)
    assert torch.equal(imgs[:, 1, 0, 0].long(), torch.as_tensor(RNG_LABELS)[index])


def test_batches_are_store_rows(dm):
    train = dm.train_dataloader()
    batches = list(train)
    assert len(batches) == len(dm.train_indices) // 5  # drop_last
    for b in batches:
        assert len(b["index"]) == 5
        _check_batch(dm, b)
    seen = torch.cat([b["index"] for b in batches])
    assert len(set(seen.tolist())) == len(seen) and set(seen.tolist()) <= set(dm.train_indices)

    loaders = dm.val_dataloader()
    assert list(loaders) == list(dm.VAL_LOADERS) == ["bank", "query"]
    bank, query = loaders["bank"], loaders["query"]
    for loader, rows in ((bank, dm.train_indices), (query, dm.val_indices)):
        got = [b for b in loader]
        for b in got:
            _check_batch(dm, b)
        assert torch.equal(torch.cat([b["index"] for b in got]), torch.as_tensor(rows))
    test_loaders = dm.test_dataloader()  # same bank, held-out queries
    assert list(test_loaders) == list(dm.VAL_LOADERS)
    test_bank, test_query = test_loaders["bank"], test_loaders["query"]
    assert torch.equal(
        torch.cat([b["index"] for b in test_bank]), torch.as_tensor(dm.train_indices)
    )
    assert torch.equal(
        torch.cat([b["index"] for b in test_query]), torch.as_tensor(dm.test_indices)
    )
    assert not set(dm.test_indices) & (set(dm.val_indices) | set(dm.train_indices))


def test_train_loader_shuffles(dm):
    torch.manual_seed(0)
    a = torch.cat([b["index"] for b in dm.train_dataloader()])
    b = torch.cat([b["index"] for b in dm.train_dataloader()])
    assert not torch.equal(a, b)


def test_splits_counts_and_single_items(dm):
    labels = torch.as_tensor(RNG_LABELS)
    assert dm.num_classes == 6
    assert dm.train_class_counts() == torch.bincount(labels[dm.train_indices], minlength=6).tolist()
    expect = split_indices(RNG_LABELS, 0.25, "instance", seed=3, test_fraction=0.25)
    got = (dm.train_indices, dm.val_indices, dm.test_indices)
    assert all(np.array_equal(a, b) for a, b in zip(got, expect))
    item = StoreDataset(dm.store, dm.val_indices)[2]
    row = int(dm.val_indices[2])
    assert int(item["index"]) == row and torch.equal(item["images"], dm.store.images[row])


def test_store_built_once(tmp_path):
    src = ArraySource(RNG_LABELS)
    dm = StoreDataModule(src, str(tmp_path), image_size=4, batch_size=4)
    dm.prepare_data()
    loads = src.loads
    dm.setup("fit")
    dm.setup("validate")
    other = StoreDataModule(src, str(tmp_path), image_size=4, batch_size=4)
    other.setup("fit")
    assert loads >= 1 and src.loads == loads
    assert other.store.path == dm.store.path


def test_small_split_keeps_its_only_batch(tmp_path):
    """drop_last never drops a split smaller than one batch: training still sees data."""
    dm = StoreDataModule(ArraySource(RNG_LABELS), str(tmp_path), image_size=4, batch_size=64)
    dm.setup()
    batches = list(dm.train_dataloader())
    assert len(batches) == 1 and len(batches[0]["index"]) == len(dm.train_indices)


class RowsAsViews:
    """A deterministic stand-in for MultiCrop: two 'views' that still show each image's row."""

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        assert images.dtype == torch.uint8
        return [images.float(), images[:, :, :2, :2].float() + 0.5]


@pytest.mark.parametrize("workers", [0, 2])
def test_train_batch_transform_runs_in_the_loader(dm, workers):
    """With a batch transform set, every train batch arrives as `views` made from exactly its
    store rows (in the workers when there are some); eval loaders keep uint8 images."""
    dm.num_workers = workers
    dm.set_train_batch_transform(RowsAsViews())
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_indices) // 5
    for b in batches:
        assert set(b) == {"views", "labels", "index"}
        full, small = b["views"]
        expect = dm.store.images[b["index"]].float()
        assert torch.equal(full, expect) and torch.equal(small, expect[:, :, :2, :2] + 0.5)
        assert torch.equal(b["labels"], dm.store.labels[b["index"]])
    for b in dm.val_dataloader()["bank"]:
        _check_batch(dm, b)
    dm.set_train_batch_transform(None)
    _check_batch(dm, next(iter(dm.train_dataloader())))
