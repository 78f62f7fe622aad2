"""Cross-rank pieces with 2 gloo ranks on the CPU, compared against one process."""

import os
import socket

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
