"""Class-balanced batches for metric learning: `m` images of each of `batch_size / m` classes.

Batch-hard triplet (Hermans et al. 2017, "PK sampling") and CGD's ranking loss need positives
in every batch; plain shuffling over thousands of small classes rarely gives them any.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from shared.data.resumable import EpochResumable


class MPerClassSampler(EpochResumable, DistributedSampler):
    """Yields dataset positions so that every run of `batch_size` consecutive ones is a batch of
    `m` images from each of `batch_size // m` distinct classes; batch it with
    `DataLoader(batch_size=batch_size, drop_last=True)`.

    Class c has `ceil(n_c / m)` chunks of `m` images (each image about once an epoch; a class
    with fewer than `m` images repeats some). An epoch is the largest number of batches L
    that these chunks fill with distinct classes, a multiple of the number of ranks: a class
    gives at most L chunks and a few random chunks beyond `L * batch_size / m` wait for the
    next epoch. Each batch takes the classes that must appear in every batch left, then draws
    the others without replacement, weighted by their chunks left, so large classes spread
    over the epoch. The order depends on (seed, epoch) alone (`set_epoch`): every rank builds
    the same epoch and takes every `world_size`-th batch, disjoint shares, equally long. It is
    a `DistributedSampler`, so Lightning keeps it rather than injecting its own, and calls
    `set_epoch` each epoch.
    """

    def __init__(
        self,
        labels,
        m: int,
        batch_size: int,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        ddp = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if ddp else 1
        if rank is None:
            rank = dist.get_rank() if ddp else 0
        labels = np.asarray(labels)
        super().__init__(labels, num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
        check_m_per_class(m, batch_size)
        self.m, self.batch_size, self.per_batch = m, batch_size, batch_size // m
        self.classes, self.label_index = np.unique(labels, return_inverse=True)
        if len(self.classes) < self.per_batch:
            raise ValueError(
                f"data.m_per_class={m} with data.batch_size={batch_size} needs "
                f"{self.per_batch} classes per batch, but the training split has only "
                f"{len(self.classes)}: lower the batch size or raise data.m_per_class"
            )
        self.members = [np.flatnonzero(self.label_index == c) for c in range(len(self.classes))]
        self.chunks = np.array([-(-len(rows) // m) for rows in self.members])  # ceil(n_c / m)
        self.batches_per_rank = fillable_batches(self.chunks, self.per_batch) // self.num_replicas
        if self.batches_per_rank == 0:
            raise ValueError(
                f"data.m_per_class={m}: the {len(labels)} training images in "
                f"{len(self.classes)} classes fill fewer batches of {batch_size} than the "
                f"{self.num_replicas} rank(s)"
            )

    def epoch_batches(self) -> np.ndarray:
        """All ranks' batches of this epoch, [n_batches, batch_size] dataset positions."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n_batches = self.batches_per_rank * self.num_replicas
        quota = self._quota(rng, n_batches)
        queues = [rng.permutation(rows) for rows in self.members]
        heads = np.zeros(len(queues), dtype=np.int64)
        batches = np.empty((n_batches, self.batch_size), dtype=np.int64)
        for b in range(n_batches):
            classes = self._pick_classes(rng, quota, n_batches - b)
            quota[classes] -= 1
            for j, c in enumerate(classes):
                batches[b, j * self.m : (j + 1) * self.m] = self._take(rng, queues, heads, c)
        return batches[rng.permutation(n_batches)]

    def _quota(self, rng, n_batches: int) -> np.ndarray:
        """Chunks per class this epoch: at most one per batch, `per_batch * n_batches` in all,
        the surplus dropped at random (chunk by chunk)."""
        quota = np.minimum(self.chunks, n_batches)
        owners = np.repeat(np.arange(len(quota)), quota)  # the class of each chunk
        dropped = rng.choice(owners, len(owners) - self.per_batch * n_batches, replace=False)
        return quota - np.bincount(dropped, minlength=len(quota))

    def _pick_classes(self, rng, quota: np.ndarray, batches_left: int) -> np.ndarray:
        """`per_batch` distinct classes: those with a chunk for every batch left (else they
        could not all be placed), then others weighted by their chunks left."""
        must = np.flatnonzero(quota == batches_left)
        free = np.flatnonzero((quota > 0) & (quota < batches_left))
        n_free = self.per_batch - len(must)
        if n_free == 0:
            return must
        return np.concatenate(
            [must, rng.choice(free, n_free, replace=False, p=quota[free] / quota[free].sum())]
        )

    def _take(self, rng, queues, heads, c: int) -> np.ndarray:
        """The next `m` images of class c, reshuffling its images whenever all were used (those
        already in this chunk go last, so a chunk repeats none unless the class is smaller)."""
        out = []
        while len(out) < self.m:
            if heads[c] == len(queues[c]):
                fresh = rng.permutation(self.members[c])
                taken = np.isin(fresh, out)
                queues[c], heads[c] = np.concatenate([fresh[~taken], fresh[taken]]), 0
            n = min(self.m - len(out), len(queues[c]) - heads[c])
            out.extend(queues[c][heads[c] : heads[c] + n])
            heads[c] += n
        return np.asarray(out)

    def rank_batches(self) -> np.ndarray:
        """This rank's share of the epoch: every `num_replicas`-th batch from `rank`."""
        return self.epoch_batches()[self.rank :: self.num_replicas]

    def __iter__(self):
        return self._from_start(iter(torch.from_numpy(self.rank_batches().reshape(-1)).tolist()))

    def __len__(self) -> int:
        return self.batches_per_rank * self.batch_size


def check_m_per_class(m, batch_size: int) -> None:
    """A clear error for an `m` that cannot tile the batch."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"data.m_per_class must be null or a positive integer, got {m!r}")
    if batch_size % m or batch_size // m < 2:
        raise ValueError(
            f"data.batch_size={batch_size} must be a multiple of data.m_per_class={m} with at "
            "least 2 classes per batch (negatives for the loss)"
        )


def fillable_batches(chunks: np.ndarray, per_batch: int) -> int:
    """The most batches of `per_batch` distinct classes that `chunks[c]` chunks per class fill:
    the largest L with sum(min(chunks, L)) >= per_batch * L (a class gives one per batch)."""
    n = int(chunks.sum()) // per_batch
    while n > 0 and np.minimum(chunks, n).sum() < per_batch * n:
        n -= 1
    return n
