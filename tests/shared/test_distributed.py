"""Cross-rank pieces with 2 gloo ranks on the CPU, compared against one process."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from selfsup.dino import DINOLoss
from shared.distributed import gather_by_index
from shared.retrieval.knn import knn_accuracy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(0)
    n_bank, n_query, d, c = 60, 23, 16, 5  # 23 queries: the sampler pads one duplicate
    centers = torch.randn(c, d, generator=g)
    bank_y = torch.arange(n_bank) % c
    query_y = torch.arange(n_query) % c
    noise_b, noise_q = torch.randn(n_bank, d, generator=g), torch.randn(n_query, d, generator=g)
    bank = torch.nn.functional.normalize(centers[bank_y] + noise_b, dim=1)
    query = torch.nn.functional.normalize(centers[query_y] + noise_q, dim=1)
    teacher = torch.randn(2 * 8, 32, generator=g)
    return bank, bank_y, query, query_y, teacher


def _worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    bank, bank_y, query, query_y, teacher = _data()
    results = {}
    for name, (x, y) in {"bank": (bank, bank_y), "query": (query, query_y)}.items():
        idx = torch.tensor(list(DistributedSampler(range(len(x)), world, rank, shuffle=False)))
        index, emb, labels = gather_by_index(idx, x[idx], y[idx])
        results[name] = (index, emb, labels)
    results["knn"] = knn_accuracy(
        results["bank"][1], results["bank"][2], results["query"][1], results["query"][2], ks=(5, 10)
    )
    # DINO centre: each rank sees its half of the teacher batch (2 views x 4 samples).
    halves = teacher.view(2, 8, -1)[:, rank * 4 : (rank + 1) * 4].reshape(8, -1)
    loss = DINOLoss(32)
    loss.update_center(halves)
    results["center"] = loss.center
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_equal_one(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    bank, bank_y, query, query_y, teacher = _data()
    single_knn = knn_accuracy(bank, bank_y, query, query_y, ks=(5, 10))
    single = DINOLoss(32)
    single.update_center(teacher)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        # Padding removed: exactly the rows of the dataset, once each, in index order.
        assert torch.equal(r["query"][0], torch.arange(len(query)))
        assert torch.equal(r["query"][1], query) and torch.equal(r["query"][2], query_y)
        assert torch.equal(r["bank"][1], bank)
        assert r["knn"] == single_knn
        torch.testing.assert_close(r["center"], single.center)


def test_gather_by_index_one_process_sorts_and_drops_repeats():
    """One process: rows come back sorted by index, the first copy of a repeated index
    kept, every dtype (bfloat16 included) moved alike; an index-order reference by loop."""
    g = torch.Generator().manual_seed(3)
    index = torch.tensor([5, 2, 9, 2, 0, 7, 5, 1])
    x = torch.randn(len(index), 4, generator=g)
    y = torch.arange(len(index)) * 10
    half = x.to(torch.bfloat16)
    got_index, got_x, got_y, got_half = gather_by_index(index, x, y, half)
    first = {}
    for row, i in enumerate(index.tolist()):
        first.setdefault(i, row)
    keep = [first[i] for i in sorted(first)]
    assert got_index.tolist() == sorted(first)
    assert torch.equal(got_x, x[keep]) and torch.equal(got_y, y[keep])
    assert got_half.dtype == torch.bfloat16 and torch.equal(got_half, half[keep])


def test_gather_by_index_in_order_rows_are_not_copied():
    x = torch.randn(6, 3)
    index, out = gather_by_index(torch.arange(6), x)
    assert out is x and torch.equal(index, torch.arange(6))


def test_gather_by_index_row_count_mismatch_raises():
    with pytest.raises(ValueError, match="rows for"):
        gather_by_index(torch.tensor([1, 0]), torch.zeros(3, 2))
