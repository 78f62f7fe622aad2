"""LightningDataModule over an image store: index splits, uint8 batches, no per-sample work.

Batches are dicts `{"images": uint8 [B,3,S,S], "labels": int64 [B], "index": int64 [B]}`
where `index` is the store row, so evaluators can de-duplicate what DDP samplers pad. A
shard store's train batches hold its whole images instead, each at its own aspect, padded to
one tensor, with `"sizes": int64 [B, 2]` (h, w): crops are drawn over the whole image.
Augmentation is the LightningModule's: on the device after transfer, or, when the module
hands its batch transform over (`set_train_batch_transform`), inside the train loader, so
`num_workers` processes augment whole batches in parallel (`images` becomes `views`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from shared.config import require_int
from shared.data.augment import TransformBatch, pad_images
from shared.data.object_store import is_s3
from shared.data.resumable import ResumableDistributedSampler, ResumableLoader, ShuffleSampler
from shared.data.samplers import MPerClassSampler, check_m_per_class
from shared.data.shards import ShardStore, build_shard_store, check_shard_settings
from shared.data.sources import UNLABELLED, class_counts
from shared.data.store import ImageStore, build_store
from shared.data.streaming import build_train_store, check_stream, streaming_train_loader

# memmap: raw pixels, fastest reads; shards: encoded litdata chunks, for data beyond one disk.
STORE_KINDS = ("memmap", "shards")


class StoreDataset(Dataset):
    """Rows `indices` of a store; `__getitems__` fetches a whole batch in one memmap gather
    (or, from a shard store, decodes it where it is fetched: in the loader worker).

    `whole`: the images as stored, each at its own aspect (a shard store's train reads),
    padded into one batch with their `sizes` [B, 2] (h, w), so the augmentation crops boxes
    over the whole image; otherwise the store's centre squares (evaluation)."""

    def __init__(self, store: ImageStore, indices: np.ndarray, whole: bool = False) -> None:
        self.store, self.whole = store, whole
        self.indices = torch.as_tensor(np.asarray(indices), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        rows = self.indices[torch.as_tensor(positions)]
        if self.whole:
            images, sizes = pad_images(self.store.images.whole(rows))
        else:
            images, sizes = self.store.images[rows], None
        batch = {"images": images, "labels": self.store.labels[rows], "index": rows}
        return batch if sizes is None else {**batch, "sizes": sizes}

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([position])
        return {k: v[0] for k, v in batch.items()}


def _as_batch(batch):
    return batch


def split_indices(
    labels: np.ndarray,
    val_fraction: float,
    split_by: str = "instance",
    seed: int = 0,
    test_fraction: float = 0.0,
    groups: list | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / val / test row indices; test is empty when `test_fraction` is 0.

    `instance`: every class keeps at least one image in train and gives about
    `val_fraction` of its images to val and `test_fraction` to test (the kNN protocol:
    queries of known classes). `group`: the same, drawing whole `groups` (an item shot
    twice, near-duplicates) so no group is on two sides: a query never finds its own twin in
    the bank. `class`: whole classes go to val and to test (the SOP / CUB protocol for
    metric learning). Val chooses checkpoints and hyper-parameters; test is scored once, at
    the end, so its figures are not selected on. Unlabelled rows (`UNLABELLED`) all go to
    train; the labelled rows split exactly as they would alone.
    """
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0 or (key == "val_fraction" and value == 0.0):
            expected = "(0, 1)" if key == "val_fraction" else "[0, 1)"
            raise ValueError(f"data.{key} must be in {expected}, got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"data.val_fraction + data.test_fraction must be below 1 (train needs images), "
            f"got {val_fraction} + {test_fraction}"
        )
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    labelled = np.flatnonzero(labels != UNLABELLED)
    if len(labelled) == 0:
        raise ValueError(
            f"all {len(labels)} images are unlabelled (empty label cells): val and test need "
            "labelled images to score on"
        )
    if len(labelled) < len(labels):
        rows = split_indices(
            labels[labelled], val_fraction, split_by, seed, test_fraction,
            None if groups is None else np.asarray(groups)[labelled],
        )  # fmt: skip
        unlabelled = np.flatnonzero(labels == UNLABELLED)
        return np.union1d(labelled[rows[0]], unlabelled), labelled[rows[1]], labelled[rows[2]]
    classes = np.unique(labels)
    split = np.zeros(len(labels), dtype=np.int8)  # 0 train, 1 val, 2 test
    if split_by == "class":
        order = rng.permutation(classes)
        n_val = max(1, round(val_fraction * len(classes)))
        n_test = round(test_fraction * len(classes))
        if test_fraction > 0:
            n_test = max(1, n_test)
        split[np.isin(labels, order[:n_val])] = 1
        split[np.isin(labels, order[n_val : n_val + n_test])] = 2
    elif split_by == "instance":
        for c in classes:
            rows = rng.permutation(np.flatnonzero(labels == c))
            n_test = min(len(rows) - 1, int(round(test_fraction * len(rows))))
            n_val = min(len(rows) - 1 - n_test, int(round(val_fraction * len(rows))))
            split[rows[:n_val]] = 1
            split[rows[n_val : n_val + n_test]] = 2
    elif split_by == "group":
        _split_groups(labels, groups, val_fraction, test_fraction, rng, split)
    else:
        raise ValueError(f"data.split_by must be 'instance', 'group' or 'class', got {split_by!r}")
    train, val, test = (np.flatnonzero(split == k) for k in range(3))
    if len(train) == 0 or len(val) == 0 or (test_fraction > 0 and len(test) == 0):
        raise ValueError(
            f"empty split: {len(train)} train, {len(val)} val and {len(test)} test images from "
            f"{len(labels)} images in {len(classes)} classes (val_fraction={val_fraction}, "
            f"test_fraction={test_fraction}, split_by={split_by})"
        )
    return train, val, test


def _split_groups(labels, groups, val_fraction, test_fraction, rng, split) -> None:
    """Per class, whole groups in random order to test, then val, until each has about its
    fraction of the class's images; the class keeps at least one group in train."""
    if groups is None:
        raise ValueError(
            "data.split_by=group needs a group per image: set data.source.group_col "
            "(a CSV column) or use split_by=instance"
        )
    groups = np.asarray(groups, dtype=str)
    _, group_ids = np.unique(groups, return_inverse=True)
    pairs = np.unique(np.stack([group_ids, labels]), axis=1)  # one column per (group, label)
    spans = np.flatnonzero(np.bincount(pairs[0]) > 1)
    if len(spans):
        raise ValueError(
            f"{len(spans)} group(s) hold images of several labels (e.g. "
            f"{groups[group_ids == spans[0]][0]!r}): a group must sit inside one class for "
            "data.split_by=group"
        )
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        _, member = np.unique(group_ids[rows], return_inverse=True)  # group of each row
        sizes = np.bincount(member)
        targets = {2: round(test_fraction * len(rows)), 1: round(val_fraction * len(rows))}
        taken = {1: 0, 2: 0}
        side_of = np.zeros(len(sizes), dtype=np.int8)
        for g in rng.permutation(len(sizes))[:-1]:  # the last group stays in train
            side = next((k for k in (2, 1) if taken[k] < targets[k]), 0)
            if side == 0:
                break
            side_of[g], taken[side] = side, taken[side] + sizes[g]
        split[rows] = side_of[member]


class StoreDataModule(LightningDataModule):
    """Train on the train split; validate on {bank: train un-augmented, query: val} and
    test on {bank: train un-augmented, query: test}, the held-out split.

    Evaluation loaders come as a dict by name, `VAL_LOADERS` its keys; evaluator callbacks
    ask for them by name (`callbacks.knn.bank_loader`, ...), never by position.
    """

    VAL_LOADERS = ("bank", "query")

    def __init__(
        self,
        source,
        store_root: str,
        image_size: int = 64,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        split_by: str = "instance",
        num_workers: int = 0,
        seed: int = 0,
        store_name: str = "store",
        store_path: str | None = None,
        pin_memory: bool = False,
        drop_last: bool = True,
        m_per_class: int | None = None,
        store_kind: str = "memmap",
        shard_shorter_side: int | None = None,
        shard_format: str = "jpeg",
        shard_quality: int = 90,
        shard_chunk_bytes: str = "64MB",
        shard_workers: int | None = None,
        s3_endpoint: str | None = None,
        s3_cache_dir: str | None = None,
        s3_cache_size: str | None = "25GB",
        stream: bool = False,
    ) -> None:
        super().__init__()
        if store_kind not in STORE_KINDS:
            raise ValueError(f"data.store_kind={store_kind!r} is not one of {STORE_KINDS}")
        if is_s3(store_path or store_root) and store_kind != "shards":
            raise ValueError(
                f"data.store_root / data.store_path {store_path or store_root!r} is in object "
                f"storage, which only data.store_kind=shards supports (got {store_kind!r})"
            )
        check_stream(stream, store_kind, m_per_class)
        if store_kind == "shards":
            check_shard_settings(image_size, shard_shorter_side, shard_format, shard_quality)
        require_int("data.image_size", image_size, 1)
        require_int("data.batch_size", batch_size, 1)
        require_int("data.eval_batch_size", eval_batch_size, 1)
        require_int("data.num_workers", num_workers, 0)
        if m_per_class is not None:
            check_m_per_class(m_per_class, batch_size)
        self.source = source
        self.store_root, self.image_size = store_root, image_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.split_by, self.seed = split_by, seed
        self.num_workers, self.pin_memory, self.drop_last = num_workers, pin_memory, drop_last
        self.store_name, self.store_path = store_name, store_path
        self.m_per_class = m_per_class
        self.store_kind = store_kind
        self.shards = dict(
            shorter_side=shard_shorter_side, fmt=shard_format, quality=shard_quality,
            chunk_bytes=shard_chunk_bytes, workers=shard_workers, s3_endpoint=s3_endpoint,
            s3_cache_dir=s3_cache_dir, s3_cache_size=s3_cache_size,
        )  # fmt: skip
        self.stream = stream
        self.store: ImageStore | ShardStore | None = None
        self.train_store: ShardStore | None = None  # the train rows' own shards, to stream
        self.train_indices = self.val_indices = self.test_indices = None
        self.train_batch_transform = None

    def set_train_batch_transform(self, transform) -> None:
        """Augment train batches inside the loader with `transform(uint8 images)`; None: don't.

        Set by the LightningModule before the train loader is built (its `setup`).
        """
        self.train_batch_transform = transform

    def _build(self) -> ImageStore | ShardStore:
        shards = self.store_kind == "shards"
        build, settings = (build_shard_store, self.shards) if shards else (build_store, {})
        return build(
            self.source,
            self.store_root,
            self.image_size,
            name=self.store_name,
            path=self.store_path,
            **settings,
        )

    def prepare_data(self) -> None:  # rank 0 builds; the others open it in setup
        self._build()

    def setup(self, stage: str | None = None) -> None:
        if self.store is None:
            self.store = self._build()
            self.train_indices, self.val_indices, self.test_indices = self.make_splits()
        if self.stream and self.train_store is None and stage in (None, "fit"):
            self.train_store = build_train_store(
                self.store, self.train_indices, self.shards["chunk_bytes"], self.shards["workers"]
            )

    def make_splits(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return split_indices(
            self.store.labels.numpy(), self.val_fraction, self.split_by, self.seed,
            self.test_fraction, self.store.groups,
        )  # fmt: skip

    @property
    def num_classes(self) -> int:
        self.setup()
        return self.store.num_classes

    def train_class_counts(self) -> list[int]:
        self.setup()
        return class_counts(
            self.store.labels[torch.as_tensor(self.train_indices)], self.num_classes
        )

    @property
    def bank_indices(self) -> np.ndarray:
        """The labelled train rows: the bank evaluations search (an unlabelled row's
        neighbours could vote for nothing)."""
        self.setup()
        return self.train_indices[
            self.store.labels[torch.as_tensor(self.train_indices)].numpy() != UNLABELLED
        ]

    def require_labelled_train(self, needed_by: str) -> None:
        """ValueError unless every train image has a label (`needed_by` names who needs it)."""
        unlabelled = len(self.train_indices) - len(self.bank_indices)
        if unlabelled:
            raise ValueError(
                f"{unlabelled} train images are unlabelled (empty label cells): {needed_by} "
                "needs a label for every training image"
            )

    def _loader(
        self, indices, batch_size: int, drop_last: bool, transform=None, sampler=None
    ) -> DataLoader:
        """A loader over `indices` in order; with a `sampler`, a train loader whose place in
        the epoch goes into checkpoints, and which reads a shard store's whole images."""
        if len(indices) == 0:
            raise ValueError("cannot build a dataloader over an empty split")
        return (DataLoader if sampler is None else ResumableLoader)(
            StoreDataset(
                self.store,
                indices,
                whole=sampler is not None and isinstance(self.store, ShardStore),
            ),
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last and len(indices) >= batch_size,
            num_workers=self.num_workers,
            collate_fn=_as_batch if transform is None else TransformBatch(transform),
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_sampler(self, dataset_size: int):
        """`m_per_class` images of each class in every train batch, else a shuffle: under DDP
        the `DistributedSampler` Lightning would add (its seed), otherwise `RandomSampler`'s
        order. Each can resume inside an epoch."""
        if self.m_per_class is not None:
            self.require_labelled_train(f"data.m_per_class={self.m_per_class} (or null)")
            labels = self.store.labels[torch.as_tensor(self.train_indices)].numpy()
            return MPerClassSampler(labels, self.m_per_class, self.batch_size, self.seed)
        if dist.is_available() and dist.is_initialized():
            return ResumableDistributedSampler(range(dataset_size), shuffle=True, seed=self.seed)
        return ShuffleSampler(range(dataset_size))

    def train_dataloader(self) -> DataLoader:
        if self.stream:  # litdata's loader over the train rows' shards (shared.data.streaming)
            return streaming_train_loader(
                self.train_store, self.batch_size, self.num_workers, self.seed,
                self.drop_last and len(self.train_store) >= self.batch_size,
                self.train_batch_transform, self.pin_memory,
            )  # fmt: skip
        return self._loader(
            self.train_indices,
            self.batch_size,
            self.drop_last or self.m_per_class is not None,  # m_per_class: whole batches only
            self.train_batch_transform,
            self.train_sampler(len(self.train_indices)),
        )

    def bank_dataloader(self) -> DataLoader:
        return self._loader(self.bank_indices, self.eval_batch_size, False)

    def query_dataloader(self, split: str = "val") -> DataLoader:
        rows = self.val_indices if split == "val" else self.test_indices
        if split == "test" and len(rows) == 0:
            raise ValueError(
                "no test split: data.test_fraction is 0 (set it above 0, or test=false)"
            )
        return self._loader(rows, self.eval_batch_size, False)

    def eval_dataloaders(self, split: str) -> dict[str, DataLoader]:
        """The loaders of one evaluation by name (the keys are `VAL_LOADERS`)."""
        return {"bank": self.bank_dataloader(), "query": self.query_dataloader(split)}

    def val_dataloader(self) -> dict[str, DataLoader]:
        return self.eval_dataloaders("val")

    def test_dataloader(self) -> dict[str, DataLoader]:
        return self.eval_dataloaders("test")
