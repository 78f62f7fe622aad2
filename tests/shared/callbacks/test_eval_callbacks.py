"""The evaluation callbacks score exactly what the retrieval functions give, flat or IVF."""

from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from shared.callbacks.embeddings import EmbeddingCallback
from shared.callbacks.knn import KNNCallback
from shared.callbacks.matching_eval import MatchingEvalCallback
from shared.retrieval.knn import knn_accuracy
from shared.retrieval.threshold import threshold_sweep

TRAINER = SimpleNamespace(sanity_checking=True, testing=False, is_global_zero=True, current_epoch=0)


def clustered(n: int, classes: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.nn.functional.normalize(centres[y] + 0.8 * torch.randn(n, dim, generator=g), dim=1)
    return x, y


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_knn_callback_equals_knn_accuracy(index):
    bank, bank_y = clustered(400, 7, 16, 0)
    query, query_y = clustered(90, 7, 16, 1)
    cb = KNNCallback(ks=(5, 20), device="cpu", index=index, nlist=8, nprobe=8, target_recall=None)
    got = cb.evaluate(
        {
            "bank": {"embeddings": bank, "labels": bank_y},
            "query": {"embeddings": query, "labels": query_y},
        },
        TRAINER,
    )
    # IVF visiting all 8 cells is an exact search: the flat figures.
    want = knn_accuracy(bank, bank_y, query, query_y, ks=(5, 20), device="cpu")
    assert got == {f"knn_top1@{k}": want[k] for k in (5, 20)}
    assert 0.0 < got["knn_top1@20"] < 1.0


def test_matching_callback_ivf_all_cells_equals_flat():
    emb, y = clustered(300, 40, 16, 2)
    batch = {"fold": {"embeddings": emb, "labels": y}}
    flat = MatchingEvalCallback(k=11).evaluate(batch, TRAINER)
    ivf = MatchingEvalCallback(k=11, index="ivf", nlist=6, nprobe=6, target_recall=None)
    ivf = ivf.evaluate(batch, TRAINER)
    assert ivf == pytest.approx(flat, abs=1e-12)
    # and the flat figure is the sweep of a brute-force top-11 by inner product
    x = emb.numpy()
    sims = x @ x.T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :11]
    ref = threshold_sweep(np.take_along_axis(sims, idx, 1), idx, y.numpy(), np.linspace(0, 1, 101))
    assert flat["f1"] == pytest.approx(ref.best_f1, abs=1e-6)
    # coarse IVF (1 of 6 cells) is a different, approximate answer: the option reaches FAISS
    coarse = MatchingEvalCallback(k=11, index="ivf", nlist=6, nprobe=1, target_recall=None)
    coarse = coarse.evaluate(batch, TRAINER)
    assert coarse["f1"] != pytest.approx(flat["f1"], abs=1e-9)


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_knn_callback_tuned_index_logs_recall(index):
    bank, bank_y = clustered(2000, 7, 16, 3)
    query, query_y = clustered(300, 7, 16, 4)
    data = {
        "bank": {"embeddings": bank, "labels": bank_y},
        "query": {"embeddings": query, "labels": query_y},
    }
    flat = KNNCallback(ks=(5, 20), device="cpu").evaluate(data, TRAINER)
    assert "search_recall" not in flat
    # target 1.0 over all 300 queries (the sample holds them all): the exact neighbours
    exact = KNNCallback(ks=(5, 20), device="cpu", index=index, target_recall=1.0)
    got = exact.evaluate(data, TRAINER)
    assert got == {**flat, "search_recall": 1.0}
    # a lower target: the recall reached is logged, and top-1 moves by at most the share of
    # queries whose 20 neighbours are not all the exact ones
    loose = KNNCallback(ks=(5, 20), device="cpu", index=index, nlist=40, target_recall=0.8)
    got = loose.evaluate(data, TRAINER)
    assert 0.8 <= got["search_recall"] <= 1.0
    missed = 1.0 - got["search_recall"]  # mean share of the 20 missed, so of queries < 20x
    for key in ("knn_top1@5", "knn_top1@20"):
        assert abs(got[key] - flat[key]) <= 20 * missed + 1e-9


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_matching_callback_tuned_index_logs_recall(index):
    emb, y = clustered(600, 80, 16, 5)
    batch = {"fold": {"embeddings": emb, "labels": y}}
    flat = MatchingEvalCallback(k=11).evaluate(batch, TRAINER)
    tuned = MatchingEvalCallback(k=11, index=index, target_recall=1.0).evaluate(batch, TRAINER)
    assert tuned.pop("search_recall") == 1.0
    assert tuned == pytest.approx(flat, abs=1e-6)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        return {"embeddings": torch.full((2,), float(row)), "labels": row % 3, "index": row}


class _Echo(L.LightningModule):
    """validation_step returns the loader's rows as embeddings, so each part is traceable."""

    def __init__(self, loaders):
        super().__init__()
        self.loaders = loaders

    def val_dataloader(self):
        return self.loaders

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return batch


class _Record(EmbeddingCallback):
    def evaluate(self, data, trainer):
        self.data = data
        return {name: float(part["index"].sum()) for name, part in data.items()}


def _loader(rows):
    return torch.utils.data.DataLoader(_Rows(rows), batch_size=2)


def _validate(loaders):
    record = _Record()
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[record],
    )  # fmt: skip
    metrics = trainer.validate(_Echo(loaders), verbose=False)
    return record, metrics


def test_evaluation_loaders_reach_the_callback_by_name_in_any_order():
    rows = {"query": [10, 11, 12], "bank": [0, 1, 2, 3, 4]}  # not the usual order
    record, metrics = _validate({name: _loader(r) for name, r in rows.items()})
    assert list(record.data) == ["query", "bank"]
    for name, r in rows.items():
        assert record.data[name]["index"].tolist() == r
        assert record.data[name]["embeddings"][:, 0].tolist() == [float(x) for x in r]
    # one set of names, without Lightning's /dataloader_idx_<i> suffix
    assert metrics[0] == {"val/query": 33.0, "val/bank": 10.0}


def test_evaluation_loaders_as_a_list_are_refused_by_name():
    with pytest.raises(TypeError, match="must return a dict of loaders by name"):
        _validate([_loader([0, 1]), _loader([2, 3])])
