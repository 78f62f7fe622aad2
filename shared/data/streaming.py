"""Streaming training over a shard store: litdata's `StreamingDataset` + `StreamingDataLoader`.

`data.stream=true` (with `data.store_kind=shards`) trains the way litdata is meant to be used:
each DDP rank and loader worker reads its own chunks in a shuffled order fixed by
(`data.seed`, epoch), and the loader's `state_dict` goes into the checkpoint so a run resumed
mid-epoch continues that epoch with the rows it had not seen. Evaluation keeps the random-
access reads of the full store (`ShardImages`).

A `StreamingDataset` can only be narrowed to contiguous runs of a chunk, while the train split
is any set of rows (seeded per class, or folds). So the train rows are written once as a shard
store of their own, beside the full one: their encoded bytes and columns copied (nothing
re-encoded), keyed by the full store's key and a hash of the rows, built, published and
verified as every store is (`build_keyed`). A sample also names its row of the full store,
which train batches carry as `index` (the online probe reads those rows back).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from litdata import StreamingDataLoader
from torch.utils.data import default_collate

from shared.data.augment import TransformBatch, pad_images
from shared.data.object_store import S3Location
from shared.data.shards import (
    ShardStore,
    decode_shard_whole,
    open_streaming,
    publish_remote,
    read_back,
    shard_damage,
    write_chunks,
)
from shared.data.sources import class_counts
from shared.data.store import announce, build_keyed

log = logging.getLogger(__name__)

TRAIN_STORE_VERSION = 1


def check_stream(stream: bool, store_kind: str, m_per_class: int | None) -> None:
    """ValueError naming the key unless `data.stream` can be honoured."""
    if not isinstance(stream, bool):
        raise ValueError(f"data.stream={stream!r} must be true or false")
    if stream and store_kind != "shards":
        raise ValueError(
            f"data.stream=true streams a shard store: set data.store_kind=shards "
            f"(got data.store_kind={store_kind!r})"
        )
    if stream and m_per_class is not None:
        raise ValueError(
            f"data.m_per_class={m_per_class} needs batches drawn class by class, which a "
            "stream of chunks cannot give: set data.m_per_class=null or data.stream=false"
        )


def build_train_store(
    store: ShardStore,
    rows,
    chunk_bytes: str = "64MB",
    workers: int | None = None,
    start_method: str | None = None,
) -> ShardStore:
    """Open the shard store of `store`'s `rows` (in that order), copying their samples into
    it first if needed: `<store dir>-train-<key>`, key = hash(store key, rows); for a store
    in a bucket, beside it in the bucket (built locally, then published as every bucket
    store is)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or len(rows) == 0:
        raise ValueError("the train split has no rows to stream")
    if rows.min() < 0 or rows.max() >= len(store):
        raise ValueError(f"train rows outside 0..{len(store) - 1} of {store.path}")
    blob = json.dumps(
        {
            "version": TRAIN_STORE_VERSION,
            "parent": store.meta["key"],
            "rows": hashlib.sha1(rows.tobytes()).hexdigest(),
        }
    ).encode()
    key = hashlib.sha1(blob).hexdigest()[:12]
    remote = isinstance(store.path, S3Location)
    if remote:  # beside the parent in its bucket
        path = dataclasses.replace(store.path, url=f"{store.path}-train-{key}")
    else:
        path = store.path.parent / f"{store.path.name}-train-{key}"

    def write(tmp: Path) -> None:
        copy = _CopyRows(store.path, [store.samples[r] for r in rows.tolist()])
        log.info("Copying %d train rows of %s into %s", len(rows), store.path, tmp)
        stored, found = read_back(
            tmp, write_chunks(copy, len(rows), tmp, chunk_bytes, workers, start_method)
        )
        if stored != list(range(len(rows))):
            raise RuntimeError(f"copying the train rows of {store.path} lost rows")
        meta = {k: v for k, v in store.meta.items() if k not in ("samples", "checksums")}
        labels = store.labels[torch.as_tensor(rows)]
        pick = {
            name: None if store.meta.get(name) is None else [store.meta[name][r] for r in rows]
            for name in ("ids", "groups", "titles")
        }
        meta |= {
            "key": key,
            "parent": {"path": str(store.path), "key": store.meta["key"]},
            "store_rows": rows.tolist(),
            "num_images": len(rows),
            "num_skipped": 0,
            "labels": labels.tolist(),
            **pick,
            "class_counts": class_counts(labels.numpy(), store.num_classes),
            **found,
        }
        (tmp / "meta.json").write_text(json.dumps(meta))

    built = (
        publish_remote(path, key, write) if remote else build_keyed(path, key, shard_damage, write)
    )
    train = ShardStore.open(path, store.image_size)
    announce(path, built, len(train))
    return train


class _CopyRows:
    """What each optimize worker runs on positions of the train split: the full store's
    sample as stored (bytes and columns), renumbered, naming its full-store row."""

    def __init__(self, parent: Path, samples: list[int]) -> None:
        self.parent, self.samples = parent, samples  # a Path or an S3Location
        self._dataset = None  # opened in the worker, once

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_dataset": None}

    def __call__(self, positions: list[int]):
        if self._dataset is None:
            self._dataset = open_streaming(self.parent)
        for position in positions:
            # bytes, not the memoryview into the chunk litdata reads them as
            item = {
                k: bytes(v) if isinstance(v, memoryview) else v
                for k, v in self._dataset[self.samples[position]].items()
            }
            item["store_row"], item["row"] = item["row"], position
            yield item


class DecodeItem:
    """A train store sample -> `{"images": uint8 [3, h, w], "labels", "index"}`: the whole
    stored image at its own aspect (crops are drawn over it), the full store's row as
    `index`; runs in the loader workers (litdata's dataset `transform`)."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt

    def __call__(self, item: dict) -> dict:
        return {
            "images": decode_shard_whole(item["image"], self.fmt),
            "labels": int(item["label"]),
            "index": int(item["store_row"]),
        }


class StreamCollate:
    """The items of a batch as the random-access train loader gives them (whole images padded
    into one tensor with their `sizes`), then the module's train batch transform (if any) in
    the worker that fetched it, as `TransformBatch` does."""

    def __init__(self, transform=None) -> None:
        self.transform = TransformBatch(transform) if transform is not None else None

    def __call__(self, items: list[dict]) -> dict:
        images, sizes = pad_images([item.pop("images") for item in items])
        batch = {"images": images, **default_collate(items), "sizes": sizes}
        return self.transform(batch) if self.transform is not None else batch


class StreamingTrainLoader(StreamingDataLoader):
    """litdata's loader with the pass's order tied to the trainer's epoch, not to how many
    passes this loader object has made: a run resumed at an epoch's end (its loader made
    afresh) streams that epoch in the uninterrupted run's order. `LoaderPositionCallback`
    calls `set_epoch` at each epoch start and hands a mid-epoch state over (`load_state_dict`)
    before the first batch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._epoch: int | None = None
        self._resuming = False

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._resuming = self.restore  # False for a state saved at the end of its pass

    def __iter__(self):
        # A generator: this runs at the first batch, after Lightning's epoch-start hooks, though
        # Lightning makes the iterator before them.
        if self._resuming:
            self._resuming = False  # this pass continues the loaded state
        else:
            # Lightning stops at the loader's length, so litdata's pass never runs to the end
            # that would clear a restored state: a new pass clears it here.
            self.restore = False
            if self._epoch is not None:
                self.current_epoch = self._epoch  # litdata counts passes from 1: it adds one
        yield from super().__iter__()


def streaming_train_loader(
    train: ShardStore,
    batch_size: int,
    num_workers: int,
    seed: int,
    drop_last: bool,
    transform=None,
    pin_memory: bool = False,
) -> StreamingTrainLoader:
    """The train loader over the train store: shuffled by `seed` and the epoch; under DDP
    every rank gets the same number of whole batches (litdata's drop_last), else
    `drop_last` drops the one partial batch."""
    distributed = dist.is_available() and dist.is_initialized()
    dataset = open_streaming(
        train.path,
        shuffle=True,
        seed=seed,
        drop_last=drop_last or distributed,
        transform=DecodeItem(train.meta["format"]),
    )
    return StreamingTrainLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=StreamCollate(transform),
        pin_memory=pin_memory,
        # each pass sends the dataset (its epoch, a loaded state) to fresh workers
        persistent_workers=False,
    )
