"""Postings CSV ingestion, bad input, the evaluation sweep and matches.csv."""

import logging
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from matching.data import ProductsDataModule, refuse_moved_keys
from matching.folds import make_folds
from matching.infer import read_matches, write_matches
from shared.data.sources import FolderSource, PostingsSource, synthetic_postings
from shared.modules.metric_learning import MetricLearningModule
from shared.retrieval.search import knn_search
from shared.retrieval.threshold import matches_from_threshold, sweep_embeddings

SPEC = dict(
    num_families=5, groups_per_family=2, min_instances=2, max_instances=4, image_size=32, seed=3
)


IMAGES = {}


@pytest.fixture(scope="module")
def postings(tmp_path_factory):
    csv = synthetic_postings(tmp_path_factory.mktemp("postings"), SPEC)
    IMAGES["dir"] = csv.parent / "images"
    return csv, pd.read_csv(csv, dtype=str)


def datamodule(tmp_path, csv, background=(255, 255, 255), **kw):
    return ProductsDataModule(
        PostingsSource(str(csv), str(IMAGES["dir"]), background=background),
        store_root=str(tmp_path / "stores"),
        image_size=32,
        batch_size=4,
        n_folds=kw.pop("n_folds", 3),
        **kw,
    )


def test_store_and_folds_from_csv(tmp_path, postings):
    csv, frame = postings
    dm = datamodule(tmp_path, csv, fold=1)
    dm.setup()
    assert len(dm.store) == len(frame)
    assert dm.store.ids == frame.posting_id.tolist()
    groups = frame.label_group.to_numpy()
    train, val = set(groups[dm.train_indices]), set(groups[dm.val_indices])
    test = set(groups[dm.test_indices])
    assert train.isdisjoint(val) and len(val) > 0
    assert test.isdisjoint(train | val) and len(test) > 0  # held out from training and choice
    assert set(dm.folds[dm.test_indices]) == {2} and set(dm.folds[dm.val_indices]) == {1}
    # The store's integer labels and groups give the folds of the CSV's own columns.
    assert np.array_equal(dm.folds, make_folds(frame.label_group, frame.image_phash, 3))
    assert list(dm.val_dataloader()) == list(dm.test_dataloader()) == list(dm.VAL_LOADERS)
    batch = next(iter(dm.val_dataloader()["fold"]))
    assert batch["images"].shape[1:] == (3, 32, 32)


@pytest.mark.parametrize("column", ["label_group", "posting_id"])
def test_csv_missing_required_column(tmp_path, postings, column):
    csv, frame = postings
    bad = tmp_path / "bad.csv"
    frame.drop(columns=[column]).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=column):
        datamodule(tmp_path, bad).setup()


def test_duplicated_posting_id(tmp_path, postings):
    csv, frame = postings
    bad = tmp_path / "dup.csv"
    frame.assign(posting_id=frame.posting_id.where(frame.index != 1, frame.posting_id[0])).to_csv(
        bad, index=False
    )
    with pytest.raises(ValueError, match="duplicated"):
        datamodule(tmp_path, bad).setup()


def test_image_listed_but_missing(tmp_path, postings):
    csv, frame = postings
    bad = tmp_path / "missing.csv"
    frame.assign(image=frame.image.where(frame.index != 2, "nope.png")).to_csv(bad, index=False)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        datamodule(tmp_path, bad).setup()


def test_fold_out_of_range(tmp_path, postings):
    with pytest.raises(ValueError, match="data.fold=5 is out of range"):
        datamodule(tmp_path, postings[0], fold=5, n_folds=5)
    with pytest.raises(ValueError, match="data.test_fold=1 must be a fold in 0..4 other than"):
        datamodule(tmp_path, postings[0], fold=1, test_fold=1, n_folds=5)


def test_single_posting_group_in_training_is_explained(tmp_path, postings, caplog):
    csv, frame = postings
    lone = tmp_path / "lone.csv"
    frame.assign(label_group=frame.label_group.where(frame.index != 0, "999")).to_csv(
        lone, index=False
    )
    dm = datamodule(tmp_path, lone, test_fold=2)
    dm.setup()
    assert dm.folds[0] not in (dm.fold, dm.test_fold), "choose data where the lone posting trains"
    module = MetricLearningModule(
        model={"type": "cgd", "embedding_dim": 48}, backbone={"name": "resnet18"}, head={}
    )
    module._trainer = SimpleNamespace(datamodule=dm)
    with caplog.at_level(logging.WARNING):
        module.setup("fit")
    assert "single training image" in caplog.text
    # one head class per training group only: the validation / test groups get none
    train_groups = sorted(set(dm.store.labels[dm.train_indices].tolist()))
    assert module.hparams.train_labels == train_groups
    assert module.hparams.num_classes == len(train_groups) < dm.num_classes
    assert module.head.weight.shape[0] == len(train_groups) * module.head.subcenters
    assert module.head_class[train_groups[-1]] == len(train_groups) - 1


def test_sweep_on_empty_fold_is_refused():
    with pytest.raises(ValueError, match="empty validation fold"):
        sweep_embeddings(np.zeros((0, 8), np.float32), np.zeros(0), np.linspace(0, 1, 5))


def test_matches_csv_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 30, 200)
    centres = rng.normal(size=(30, 16))
    emb = centres[labels] + 0.3 * rng.normal(size=(200, 16))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    ids = [f"id{i}" for i in range(200)]
    sims, idx = knn_search(emb, emb, 51)
    result, _, _ = sweep_embeddings(emb, labels, np.linspace(0, 1, 41))
    matches = matches_from_threshold(sims, idx, ids, result.best_threshold)
    path = write_matches(tmp_path / "out" / "matches.csv", ids, matches)
    back = read_matches(path)
    assert list(back) == ids
    assert all(back[i] == [str(m) for m in row] for i, row in zip(ids, matches))
    # The file's matches score the sweep's best F1 (computed here with sets).
    truth = {i: {ids[j] for j in np.flatnonzero(labels == labels[n])} for n, i in enumerate(ids)}
    f1 = np.mean([2 * len(set(back[i]) & truth[i]) / (len(back[i]) + len(truth[i])) for i in ids])
    assert f1 == pytest.approx(result.best_f1)
    assert all(back[i][0] == i for i in ids)  # every posting matches itself first


def test_errors_name_the_source_keys(tmp_path, postings):
    """Postings are a data source: hints name `data.source.*`, and the keys that moved there
    from `data.*` are refused with the new name, on the command line and in a config."""
    csv, _ = postings
    source = PostingsSource(str(csv), str(IMAGES["dir"]))
    assert "set data.source.skip_corrupt=true" in str(source.corrupt_error([0]))
    with pytest.raises(FileNotFoundError, match=r"^data.source.csv_path='/nowhere.csv' does not"):
        PostingsSource("/nowhere.csv")
    with pytest.raises(ValueError, match="synthetic_dir"):
        PostingsSource()  # neither a CSV nor synthetic products to write
    with pytest.raises(SystemExit, match=r"write data.source.synthetic.seed=\.\.\."):
        refuse_moved_keys(["data.fold=2", "data.synthetic.seed=1"])
    refuse_moved_keys(["data.fold=2", "data.source.csv_path=/a.csv"])  # new keys pass
    with pytest.raises(ValueError, match=r"write data.source.image_dir=\.\.\."):
        ProductsDataModule(source, str(tmp_path), image_dir="/x")
    for key, value in (("split_by", "instance"), ("val_fraction", 0.2)):
        with pytest.raises(ValueError, match=f"data.{key}={value!r} does not apply"):
            ProductsDataModule(source, str(tmp_path), **{key: value})


def test_class_folders_feed_folds_by_label(tmp_path):
    """A source without groups (class folders) is split by its labels: each class in one fold."""
    from shared.data.synthetic import SyntheticProducts, write_class_folders

    root = write_class_folders(SyntheticProducts(**SPEC), tmp_path / "folders")
    dm = ProductsDataModule(FolderSource(str(root)), str(tmp_path / "stores"), n_folds=3)
    dm.setup()
    labels = dm.store.labels.numpy()
    assert all(len(set(dm.folds[labels == c])) == 1 for c in np.unique(labels))
    assert len(dm.train_indices) + len(dm.val_indices) + len(dm.test_indices) == len(labels)


def test_background_is_checked_early_and_reaches_the_store(tmp_path, postings):
    """`data.source.background` is refused by name before any file is read, and keys the store."""
    csv, _ = postings
    with pytest.raises(ValueError, match=r"^data.source.background=\[0, 0\] is not a colour"):
        datamodule(tmp_path, csv, background=[0, 0])
    dm = datamodule(tmp_path, csv, background=[0, 0, 0])
    dm.setup()
    assert dm.source.background == (0, 0, 0)
    white = datamodule(tmp_path, csv)
    white.setup()
    assert white.store.path != dm.store.path


def test_inference_decodes_on_the_runs_background():
    from omegaconf import OmegaConf

    from matching.infer import run_background

    own = {"data": {"source": {"background": [1, 2, 3]}}}
    assert run_background(OmegaConf.create(own)) == (1, 2, 3)
    assert run_background(OmegaConf.create({"data": {"background": [1, 2, 3]}})) == (1, 2, 3)
    assert run_background(OmegaConf.create({"data": {}})) == (255, 255, 255)  # older runs
    with pytest.raises(ValueError, match=r"data.background=\[1, 2, 3, 4\]"):
        run_background(OmegaConf.create({"data": {"background": [1, 2, 3, 4]}}))
