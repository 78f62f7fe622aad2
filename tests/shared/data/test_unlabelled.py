"""Unlabelled rows (an empty label cell): trained on, never in an evaluation, and the labelled
rows split exactly as a CSV without the unlabelled ones would split."""

from __future__ import annotations

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from matching.data import ProductsDataModule
from shared.callbacks.online_probe import OnlineProbeCallback
from shared.data.datamodule import StoreDataModule, split_indices
from shared.data.sources import UNLABELLED, CsvSource, class_counts, synthetic_postings
from shared.instantiate import instantiate, instantiate_group
from tests.pipelines import TINY

SPEC = dict(
    num_families=6, groups_per_family=2, min_instances=3, max_instances=6, image_size=32, seed=5
)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """The synthetic postings CSV with every third group's label cells emptied, and the same
    CSV without those rows (the reference)."""
    root = tmp_path_factory.mktemp("catalog")
    csv = synthetic_postings(root, SPEC)
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    groups = frame.label_group.unique()
    blank = frame.label_group.isin(groups[::3])
    partial, labelled = root / "partial.csv", root / "labelled.csv"
    frame.assign(label_group=frame.label_group.where(~blank, "")).to_csv(partial, index=False)
    frame[~blank].to_csv(labelled, index=False)
    return {"images": csv.parent / "images", "partial": partial, "labelled": labelled,
            "blank": blank.to_numpy(), "frame": frame}  # fmt: skip


def source(catalog, which: str) -> CsvSource:
    return CsvSource(str(catalog[which]), str(catalog["images"]), label_col="label_group",
                     id_col="posting_id")  # fmt: skip


def datamodule(tmp_path, catalog, which: str, **kw) -> StoreDataModule:
    dm = StoreDataModule(source(catalog, which), str(tmp_path / which), image_size=32,
                         batch_size=4, eval_batch_size=8, seed=1, **kw)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_an_empty_label_cell_is_unlabelled(catalog):
    src, ref = source(catalog, "partial"), source(catalog, "labelled")
    assert np.array_equal(src.labels == UNLABELLED, catalog["blank"])
    assert src.class_names == ref.class_names  # "" is no class
    assert np.array_equal(src.labels[~catalog["blank"]], ref.labels)


@pytest.mark.parametrize("split_by", ["instance", "group", "class"])
@pytest.mark.parametrize("seed", [0, 3])
def test_labelled_rows_split_as_they_would_alone(split_by, seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(12), rng.integers(2, 9, 12))
    rank = np.arange(len(labels)) - np.searchsorted(labels, labels)  # place within its class
    groups = np.array([f"{c}/{k // 2}" for c, k in zip(labels, rank)])  # pairs in a class
    mixed = labels.copy()
    unlabelled = rng.random(len(labels)) < 0.3
    mixed[unlabelled] = UNLABELLED
    kept = np.flatnonzero(~unlabelled)
    got = split_indices(mixed, 0.25, split_by, seed, 0.25, groups)
    alone = split_indices(labels[kept], 0.25, split_by, seed, 0.25, groups[kept])
    assert np.array_equal(got[0], np.sort(np.r_[kept[alone[0]], np.flatnonzero(unlabelled)]))
    assert np.array_equal(got[1], kept[alone[1]])
    assert np.array_equal(got[2], kept[alone[2]])


def test_no_labelled_row_is_refused():
    with pytest.raises(ValueError, match="all 5 images are unlabelled"):
        split_indices(np.full(5, UNLABELLED), 0.2, test_fraction=0.2)


def test_the_data_module_trains_on_them_and_scores_without_them(tmp_path, catalog):
    dm = datamodule(tmp_path, catalog, "partial")
    ref = datamodule(tmp_path, catalog, "labelled")
    ids, ref_ids = np.array(dm.store.ids), np.array(ref.store.ids)
    blank_ids = set(catalog["frame"].posting_id[catalog["blank"]])
    # train: the reference's train rows plus every unlabelled row; val / test: the reference's
    assert set(ids[dm.train_indices]) == set(ref_ids[ref.train_indices]) | blank_ids
    assert list(ids[dm.val_indices]) == list(ref_ids[ref.val_indices])
    assert list(ids[dm.test_indices]) == list(ref_ids[ref.test_indices])
    # the evaluation bank: labelled train rows only, as the reference's bank
    bank = torch.cat([b["index"] for b in dm.bank_dataloader()]).numpy()
    assert list(ids[bank]) == list(ref_ids[ref.train_indices])
    assert dm.train_class_counts() == ref.train_class_counts()
    assert dm.store.meta["class_counts"] == ref.store.meta["class_counts"]
    assert class_counts([0, UNLABELLED, 2, 2], 3) == [1, 0, 2]


def test_class_balanced_sampling_and_matching_refuse_them(tmp_path, catalog):
    dm = datamodule(tmp_path, catalog, "partial", m_per_class=2)
    with pytest.raises(ValueError, match=r"train images are unlabelled .* data.m_per_class=2"):
        dm.train_dataloader()
    matching = ProductsDataModule(source(catalog, "partial"), str(tmp_path / "m"),
                                  image_size=32, n_folds=3)  # fmt: skip
    n = int(catalog["blank"].sum())
    with pytest.raises(ValueError, match=f"{n} of {len(catalog['frame'])} postings have an empty"):
        matching.setup()


class Flatten(L.LightningModule):
    def embed(self, images):
        return images.float().flatten(1) / 255


def test_the_online_probe_learns_from_labelled_rows_only():
    torch.manual_seed(0)
    images = torch.randint(0, 255, (6, 3, 2, 2), dtype=torch.uint8)
    labels = torch.tensor([0, UNLABELLED, 2, 1, UNLABELLED, 2])
    module = Flatten()
    module.log_dict = lambda *a, **k: None
    probe = OnlineProbeCallback(lr=0.5)
    probe._build(12, 3, "cpu")
    reference = nn.Linear(12, 3)
    reference.load_state_dict(probe.head.state_dict())
    trainer = type("T", (), {"datamodule": None})()

    probe.on_train_batch_end(trainer, module, None, {"images": images, "labels": labels}, 0)
    keep = labels != UNLABELLED
    loss = nn.functional.cross_entropy(reference(module.embed(images[keep])), labels[keep])
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.5 * p.grad
    for got, want in zip(probe.head.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want)

    fresh = OnlineProbeCallback(lr=0.5)
    fresh._build(12, 3, "cpu")
    before = [p.clone() for p in fresh.head.parameters()]
    none = {"images": images[:2], "labels": torch.full((2,), UNLABELLED)}
    fresh.on_train_batch_end(trainer, module, None, none, 0)
    for got, want in zip(fresh.head.parameters(), before):
        assert torch.equal(got, want)


def test_dino_fits_on_a_partly_labelled_csv(compose_cfg, catalog):
    over = [o for o in TINY["ssl"] if not o.startswith("data.source")]
    cfg = compose_cfg("ssl", [
        *over, "data/source=csv", f"data.source.csv_path={catalog['partial']}",
        f"data.source.image_dir={catalog['images']}", "data.source.label_col=label_group",
        "data.image_size=32", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
        "trainer.check_val_every_n_epoch=1",
        "callbacks=[knn,online_probe]",
    ])  # fmt: skip
    L.seed_everything(0)
    dm, module = instantiate(cfg.data, "data"), instantiate(cfg.module, "module")
    callbacks = [c for c in instantiate_group(cfg.callbacks, "callbacks") if hasattr(c, "evaluate")]
    trainer = instantiate(cfg.trainer, "trainer", logger=False, enable_progress_bar=False,
                          enable_checkpointing=False, num_sanity_val_steps=0,
                          callbacks=callbacks)  # fmt: skip
    knn = next(c for c in callbacks if type(c).__name__ == "KNNCallback")
    seen = []
    knn.evaluate = lambda data, trainer, run=knn.evaluate: seen.append(data) or run(data, trainer)
    trainer.fit(module, datamodule=dm)
    labels = dm.store.labels[torch.as_tensor(dm.train_indices)]
    assert (labels == UNLABELLED).any()  # unlabelled rows were in the training split
    # what the kNN evaluation searched: the labelled train rows, none unlabelled
    bank = seen[-1]["bank"]
    assert sorted(bank["index"].tolist()) == sorted(dm.bank_indices.tolist())
    assert not (bank["labels"] == UNLABELLED).any()
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/probe_loss"]) and "val/probe_top1" in metrics
