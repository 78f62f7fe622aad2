"""M-per-class batches: exact class counts, the epoch a greedy construction reaches, ranks."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch
from lightning import Callback

from shared.data.datamodule import StoreDataModule
from shared.data.samplers import MPerClassSampler
from tests.shared.data.test_data_datamodule import ArraySource

# 9 classes of 1..13 images: some below m, one far above the others.
UNEVEN = np.random.default_rng(0).permutation(np.repeat(np.arange(9), [1, 2, 3, 4, 5, 6, 8, 9, 13]))


def greedy_batches(labels, m: int, per_batch: int) -> int:
    """Batches of distinct classes that ceil(n_c / m) chunks fill, built the classic way
    (always the classes with the most chunks left): an independent reference for the epoch
    length."""
    left = sorted(-(-n // m) for n in Counter(labels.tolist()).values())
    n = 0
    while sum(1 for x in left if x) >= per_batch:
        left = sorted(left)
        for i in range(1, per_batch + 1):
            left[-i] -= 1
        n += 1
    return n


def label_counts(sampler, labels, batches):
    return [Counter(labels[b].tolist()) for b in batches]


@pytest.mark.parametrize(
    "labels, m, batch_size",
    [(UNEVEN, 2, 6), (UNEVEN, 4, 12), (UNEVEN, 3, 9), (np.repeat(np.arange(50), 7), 4, 32)],
)
def test_every_batch_holds_m_images_of_each_of_its_classes(labels, m, batch_size):
    sampler = MPerClassSampler(labels, m, batch_size, seed=5)
    sizes = Counter(labels.tolist())
    assert len(sampler) == greedy_batches(labels, m, batch_size // m) * batch_size
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = sampler.epoch_batches()
        for batch, counts in zip(batches, label_counts(sampler, labels, batches)):
            assert len(counts) == batch_size // m and set(counts.values()) == {m}
            for c in counts:  # a class with >= m images repeats none of them in a batch
                rows = batch[labels[batch] == c]
                assert len(set(rows.tolist())) == min(m, sizes[c])
        # as iterated: consecutive runs of batch_size positions are these batches
        assert list(sampler) == batches.reshape(-1).tolist()


def test_an_epoch_shows_every_image_when_the_chunks_fill_the_batches():
    labels = np.repeat(np.arange(12), 8)  # 24 chunks of 4: 8 batches of 3 classes
    sampler = MPerClassSampler(labels, 4, 12, seed=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert sorted(sampler) == list(range(len(labels)))


def test_uneven_classes_give_at_most_their_chunks():
    m, per_batch = 3, 3
    sampler = MPerClassSampler(UNEVEN, m, m * per_batch, seed=1)
    n_batches = len(sampler) // (m * per_batch)
    chunks = {c: -(-n // m) for c, n in Counter(UNEVEN.tolist()).items()}
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = sampler.epoch_batches()
        appearances = Counter(
            c for counts in label_counts(sampler, UNEVEN, batches) for c in counts
        )
        for c, n in appearances.items():  # at most one chunk per batch, and none made up
            assert n <= min(chunks[c], n_batches)
        # what an epoch leaves out is fewer than one batch's worth of chunks
        left_out = sum(min(chunks[c], n_batches) for c in chunks) - sum(appearances.values())
        assert 0 <= left_out < per_batch


def test_the_order_depends_on_seed_and_epoch_alone():
    def epoch(seed, e):
        s = MPerClassSampler(UNEVEN, 2, 6, seed=seed)
        s.set_epoch(e)
        return list(s)

    assert epoch(0, 0) == epoch(0, 0)
    assert epoch(0, 0) != epoch(0, 1)
    assert epoch(0, 0) != epoch(1, 0)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_take_disjoint_equal_shares_of_the_epoch(world):
    labels = np.repeat(np.arange(20), 6)
    whole = MPerClassSampler(labels, 2, 8, seed=3, num_replicas=world, rank=0).epoch_batches()
    shares = []
    for rank in range(world):
        sampler = MPerClassSampler(labels, 2, 8, seed=3, num_replicas=world, rank=rank)
        shares.append(sampler.rank_batches())
        assert len(sampler) == len(shares[0]) * 8 == len(whole) // world * 8
    rows = sorted(tuple(b) for share in shares for b in share)
    assert rows == sorted(tuple(b) for b in whole)  # together: the epoch, each batch once
    # one process gets the same epoch length as the ranks together (up to the rounding)
    single = MPerClassSampler(labels, 2, 8, seed=3, num_replicas=1, rank=0)
    assert len(whole) == len(single) // 8 // world * world


def _rank_loader(rank: int, world: int, port: int, out: str, labels) -> None:
    """One gloo rank: the sampler reads rank and world size from the process group."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sampler = MPerClassSampler(labels, 2, 8, seed=7)
        sampler.set_epoch(1)
        loader = torch.utils.data.DataLoader(
            torch.arange(len(labels)), batch_size=8, sampler=sampler, drop_last=True
        )
        torch.save([b.tolist() for b in loader], os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_see_disjoint_batches_covering_the_epoch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    labels = np.repeat(np.arange(15), [4, 5, 6] * 5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _rank_loader, args=(2, port, str(tmp_path), labels), nprocs=2, start_method="fork"
    )
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    reference = MPerClassSampler(labels, 2, 8, seed=7, num_replicas=2, rank=0)
    reference.set_epoch(1)
    whole = reference.epoch_batches()
    assert len(got[0]) == len(got[1]) == len(whole) // 2
    assert not {tuple(b) for b in got[0]} & {tuple(b) for b in got[1]}
    assert sorted(map(tuple, got[0] + got[1])) == sorted(tuple(b) for b in whole.tolist())


@pytest.mark.parametrize(
    "m, batch_size, labels, match",
    [
        (3, 8, UNEVEN, "multiple of data.m_per_class=3"),
        (8, 8, UNEVEN, "at least 2 classes per batch"),
        (0, 8, UNEVEN, "positive integer, got 0"),
        (True, 8, UNEVEN, "positive integer, got True"),
        (2, 20, UNEVEN, "needs 10 classes per batch, but the training split has only 9"),
        (2, 4, np.array([0, 0, 1]), "fill fewer batches of 4 than the 2 rank"),
    ],
)
def test_bad_settings_are_refused_by_name(m, batch_size, labels, match):
    with pytest.raises(ValueError, match=match):
        MPerClassSampler(labels, m, batch_size, num_replicas=2, rank=0)


def test_the_data_module_train_loader_uses_it_when_set(tmp_path):
    labels = np.repeat(np.arange(8), 6)
    kwargs = dict(image_size=4, batch_size=6, val_fraction=0.2, test_fraction=0.2, seed=2)
    plain = StoreDataModule(ArraySource(labels), str(tmp_path), **kwargs)
    plain.setup()
    assert isinstance(plain.train_dataloader().sampler, torch.utils.data.RandomSampler)
    dm = StoreDataModule(ArraySource(labels), str(tmp_path), m_per_class=2, **kwargs)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, MPerClassSampler)
    expect = MPerClassSampler(dm.store.labels[dm.train_indices].numpy(), 2, 6, seed=2)
    batches = [b["index"] for b in loader]
    positions = torch.as_tensor(expect.epoch_batches())
    assert torch.equal(torch.stack(batches), torch.as_tensor(dm.train_indices)[positions])
    for b in loader:
        assert sorted(Counter(b["labels"].tolist()).values()) == [2, 2, 2]
    with pytest.raises(ValueError, match="data.batch_size=6 must be a multiple"):
        StoreDataModule(ArraySource(labels), str(tmp_path), m_per_class=4, **kwargs)


class RankBatches(Callback):
    """Each rank saves the store rows of every train batch it got, per epoch."""

    def __init__(self, out: str) -> None:
        self.out, self.seen = out, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).append(batch["index"].tolist())

    def on_train_end(self, trainer, pl_module):
        torch.save(self.seen, os.path.join(self.out, f"batches_rank{trainer.global_rank}.pt"))


@pytest.mark.slow
def test_lightning_ddp_keeps_the_sampler_and_sets_its_epoch(compose_cfg, tmp_path):
    """trainer=ddp_cpu: Lightning injects no DistributedSampler of its own; each epoch the two
    ranks share the sampler's batches for that epoch, disjointly."""
    from shared.instantiate import instantiate
    from tests.pipelines import TINY

    cfg = compose_cfg(
        "matching",
        [*TINY["matching"], "trainer=ddp_cpu", "trainer.max_epochs=2", "data.m_per_class=2"],
    )
    dm = instantiate(cfg.data, "data")
    trainer = instantiate(
        cfg.trainer,
        "trainer",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[RankBatches(str(tmp_path))],
    )
    trainer.fit(instantiate(cfg.module, "module"), datamodule=dm)

    dm.setup()
    rows = torch.as_tensor(dm.train_indices)
    seen = [torch.load(tmp_path / f"batches_rank{r}.pt") for r in (0, 1)]
    for epoch in (0, 1):
        ref = MPerClassSampler(dm.store.labels[rows].numpy(), 2, 8, seed=cfg.seed, num_replicas=2)
        ref.set_epoch(epoch)
        expect = sorted(rows[torch.as_tensor(ref.epoch_batches())].tolist())
        got = [seen[r][epoch] for r in (0, 1)]
        assert len(got[0]) == len(got[1]) == len(expect) // 2
        assert sorted(got[0] + got[1]) == expect
    assert seen[0][0] != seen[0][1]  # a new order each epoch
