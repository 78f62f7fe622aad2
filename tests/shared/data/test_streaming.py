"""Streaming training over shards (`data.stream=true`): the train rows' own shard store holds
the full store's bytes; an epoch streams every train row once, in an order fixed by the seed
and the epoch; DDP ranks stream disjoint rows; a state round trip, and a real kill -9 of the
command line, continue the epoch with exactly the rows not yet trained on.

The expected rows come from the data module's split (`split_indices`), the expected pixels
from the random-access reads of the full store; the DDP trimming from what an equal number of
whole batches per rank allows.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess

import pytest
import torch
from lightning import Callback

from shared.data.datamodule import StoreDataModule
from shared.data.shards import build_shard_store
from shared.data.sources import SyntheticSource
from shared.data.streaming import build_train_store, streaming_train_loader

S = 16
SYNTH = dict(num_families=3, groups_per_family=2, min_instances=4, max_instances=6, image_size=S)


def _module(root, **kw) -> StoreDataModule:
    kw = {
        "image_size": S, "batch_size": 4, "num_workers": 2, "store_kind": "shards",
        "shard_format": "png", "shard_workers": 1, "shard_chunk_bytes": "2kB",
        "val_fraction": 0.3, "test_fraction": 0.0, "stream": True, "drop_last": False, **kw,
    }  # fmt: skip
    return StoreDataModule(SyntheticSource(**SYNTH), str(root), **kw)


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """A data module streaming a PNG shard store of several chunks (stores built by fork: the
    same code as the default spawn, without seconds of interpreter start-up)."""
    root = tmp_path_factory.mktemp("streamed")
    dm = _module(root)
    store = build_shard_store(
        dm.source, root, S, fmt="png", chunk_bytes="2kB", workers=1, start_method="fork"
    )
    dm.store = store
    dm.train_indices, dm.val_indices, dm.test_indices = dm.make_splits()
    dm.train_store = build_train_store(
        store, dm.train_indices, "2kB", workers=2, start_method="fork"
    )
    assert len(list(dm.train_store.path.glob("chunk-*.bin"))) > 3  # several chunks to split
    return dm


def _pass(loader, epoch: int | None = None, stop: int | None = None) -> list[dict]:
    if epoch is not None:
        loader.set_epoch(epoch)
    out = []
    for batch in loader:
        out.append(batch)
        if stop is not None and len(out) == stop:
            break
    return out


def _rows(batches) -> list[int]:
    return [r for b in batches for r in b["index"].tolist()]


def _sample(store, i: int) -> dict:
    from shared.data.shards import open_streaming

    return open_streaming(store.path)[i]


# --- the train store ---------------------------------------------------------------------


def test_the_train_store_holds_the_train_rows_bytes_and_columns(streamed, caplog):
    dm = streamed
    full, train, rows = dm.store, dm.train_store, dm.train_indices
    assert train.path.parent == full.path.parent and train.meta["store_rows"] == rows.tolist()
    assert torch.equal(train.labels, full.labels[torch.as_tensor(rows)])
    assert train.ids == [full.ids[r] for r in rows]
    assert train.titles == [full.titles[r] for r in rows]
    assert train.num_classes == full.num_classes
    for i, r in enumerate(rows.tolist()):  # the encoded bytes themselves, not a re-encode
        copied, original = _sample(train, train.samples[i]), _sample(full, full.samples[r])
        assert bytes(copied["image"]) == bytes(original["image"])
        assert copied["store_row"] == r and copied["id"] == original["id"]

    with caplog.at_level(logging.INFO):
        again = build_train_store(full, rows, "2kB", workers=1, start_method="fork")
    assert again.path == train.path and "Copying" not in caplog.text  # reused
    other = build_train_store(full, rows[:-1], "2kB", workers=1, start_method="fork")
    assert other.path != train.path and len(other) == len(rows) - 1


def test_a_damaged_train_store_is_named_and_copied_again(streamed, tmp_path, caplog):
    full, rows = streamed.store, streamed.train_indices[::2]
    store = build_train_store(full, rows, "2kB", workers=1, start_method="fork")
    chunk = sorted(store.path.glob("chunk-*.bin"))[0]
    size = chunk.stat().st_size
    with open(chunk, "r+b") as f:
        f.truncate(size - 1)
    with caplog.at_level(logging.WARNING):
        again = build_train_store(full, rows, "2kB", workers=1, start_method="fork")
    assert f"{chunk.name} holds {size - 1} bytes, expected {size}" in caplog.text
    assert chunk.stat().st_size == size and again.meta["store_rows"] == rows.tolist()


# --- one process ---------------------------------------------------------------------------


def test_an_epoch_streams_every_train_row_once_as_the_store_reads_it(streamed):
    dm = streamed
    loader = dm.train_dataloader()
    assert loader.num_workers == 2
    batches = _pass(loader, 0)
    rows = _rows(batches)
    assert sorted(rows) == sorted(dm.train_indices.tolist())  # each exactly once
    assert len(batches) == len(loader) == -(-len(rows) // dm.batch_size)
    for batch in batches:  # the random-access store's pixels and labels for those rows
        assert torch.equal(batch["images"], dm.store.images[batch["index"]])
        assert torch.equal(batch["labels"], dm.store.labels[batch["index"]])


def test_the_order_is_fixed_by_the_seed_and_the_epoch(streamed):
    dm = streamed

    def order(seed, epochs=(0, 1)):
        loader = streaming_train_loader(dm.train_store, 4, 2, seed, drop_last=False)
        return [_rows(_pass(loader, e)) for e in epochs]

    first, again, other = order(0), order(0), order(1)
    assert first == again  # same seed, same orders
    assert first[0] != other[0] and sorted(first[0]) == sorted(other[0])
    assert first[0] != first[1]  # each epoch its own order
    # a loader made afresh at epoch 1 (a resume at an epoch's end) streams epoch 1's order
    assert order(0, epochs=(1,))[0] == first[1]


def test_drop_last_drops_the_one_partial_batch(streamed):
    dm = streamed
    loader = streaming_train_loader(dm.train_store, 4, 2, 0, drop_last=True)
    rows = _rows(_pass(loader, 0))
    n = len(dm.train_indices)
    assert len(rows) == n // 4 * 4 == len(set(rows)) and len(loader) == n // 4


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loaded_state_streams_the_rest_of_the_epoch(streamed, workers):
    """The state after k batches, in a loader made afresh (a new process): the batches of the
    uninterrupted pass from k on."""
    dm = streamed

    def loader():
        return streaming_train_loader(dm.train_store, 4, workers, 0, drop_last=False)

    reference = [b["index"].tolist() for b in _pass(loader(), 1)]
    assert len(reference) >= 4
    for k in (1, 3):
        first = loader()
        seen = [b["index"].tolist() for b in _pass(first, 1, stop=k)]
        state = first.state_dict()
        resumed = loader()
        resumed.set_epoch(1)
        resumed.load_state_dict(state)
        rest = [b["index"].tolist() for b in _pass(resumed)]
        assert seen + rest == reference
        # the pass after the resumed one is a new epoch, whole
        nxt = _rows(_pass(resumed, 2))
        assert sorted(nxt) == sorted(dm.train_indices.tolist())


# --- bad settings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(store_kind="memmap"), "data.stream=true streams a shard store: set data.store_kind"),
        (dict(m_per_class=2), "data.m_per_class=2 needs batches drawn class by class"),
        (dict(stream="yes"), "data.stream='yes' must be true or false"),
    ],
)
def test_bad_stream_settings_are_named_before_any_build(settings, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        _module(tmp_path, **settings)
    assert list(tmp_path.iterdir()) == []


# --- the pipelines: DDP, and a real kill -9 ------------------------------------------------


class RecordRows(Callback):
    """Appends, per trained step, the store rows of its batch to `path` (one file per rank),
    closed at once: what a killed process trained on stays on disk."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        line = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "rows": batch["index"].tolist(),
        }
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps(line) + "\n")


class KillAt(Callback):
    """kill -9 of this process as global step `step` starts."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _records(path, rank: int = 0) -> list[dict]:
    with open(f"{path}.rank{rank}") as f:
        return [json.loads(line) for line in f]


def _train_rows(cfg) -> list[int]:
    """The train split of the run's config, from its data module."""
    from shared.instantiate import instantiate

    dm = instantiate(cfg.data, "data")
    dm.setup()
    return sorted(dm.train_indices.tolist())


STREAM = ["data.store_kind=shards", "data.stream=true", "data.num_workers=2", "test=false",
          "data.test_fraction=0.0"]  # fmt: skip


@pytest.mark.slow
def test_ddp_ranks_stream_disjoint_rows_each_epoch(tmp_path):
    """2 gloo ranks (trainer=ddp_cpu, forked as tests/test_ddp.py does): per epoch each rank
    trains on as many whole batches as both can have, floor(N / (2 B)) B rows, the two
    disjoint; only the N mod 2B rows left over are dropped."""
    from tests.conftest import compose_config
    from tests.pipelines import TINY
    from tests.tracking.runs import run_in_process

    record = tmp_path / "rows"
    overrides = [
        *TINY["ssl"],
        *STREAM,
        "data.batch_size=4",
        "trainer=ddp_cpu",
        "trainer.max_epochs=2",
        "eval_at_init=false",
        "+callbacks.record._target_=tests.shared.data.test_streaming.RecordRows",
        f"+callbacks.record.path={record}",
    ]
    cfg = compose_config("ssl", overrides, tmp_path)
    train = _train_rows(cfg)
    run_in_process(cfg)

    n, b = len(train), cfg.data.batch_size
    per_rank = n // (2 * b) * b
    assert per_rank >= 2 * b
    orders = []
    for epoch in (0, 1):
        ranks = [[r for x in _records(record, k) if x["epoch"] == epoch for r in x["rows"]]
                 for k in (0, 1)]  # fmt: skip
        assert [len(r) for r in ranks] == [per_rank, per_rank]
        assert len(set(ranks[0] + ranks[1])) == 2 * per_rank  # no row twice, within or across
        assert set(ranks[0] + ranks[1]) <= set(train)
        orders.append(ranks[0] + ranks[1])
    assert orders[0] != orders[1]


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_with_the_rows_it_had_not_trained_on(tmp_path):
    """`python ssl/run.py ... data.stream=true`, last.ckpt every 2 steps, kill -9 inside epoch 1
    one step after a save (that step trained, not saved); the same command in the same run
    directory: epoch 1 goes on with exactly the train rows not in the saved steps, starting
    with the very batch that was lost, then epoch 2 streams every row."""
    from tests.conftest import REPO, compose_config
    from tests.pipelines import TINY, cli, env, run_dir

    common = [
        *STREAM,
        "data.batch_size=4",
        "data.drop_last=false",
        "+trainer.limit_train_batches=1.0",  # every batch of the epoch (the tiny runs cut it)
        "trainer.max_epochs=3",
        "callbacks.last_checkpoint.every_n_train_steps=2",
        "eval_at_init=false",
        "+callbacks.record._target_=tests.shared.data.test_streaming.RecordRows",
    ]
    train = _train_rows(compose_config("ssl", [*TINY["ssl"], *STREAM], tmp_path / "probe",
                                       data_dir=tmp_path / "data"))  # fmt: skip
    per_epoch = -(-len(train) // 4)
    assert per_epoch >= 4
    saved_at = per_epoch + 2 - per_epoch % 2  # the first save (even step) inside epoch 1
    kill_at = saved_at + 1  # the step after it trains, then the process is killed
    environment = {**env(), "PYTHONPATH": os.pathsep.join([str(REPO), env().get("PYTHONPATH", "")])}

    killed = cli("ssl", tmp_path, *common, f"+callbacks.record.path={tmp_path / 'killed'}",
                 "+callbacks.kill._target_=tests.shared.data.test_streaming.KillAt",
                 f"+callbacks.kill.step={kill_at}")  # fmt: skip
    result = subprocess.run(killed, cwd=REPO, env=environment, capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    out = run_dir("ssl", tmp_path)
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == saved_at and saved["epoch"] == 1

    resumed = cli("ssl", tmp_path, *common, f"+callbacks.record.path={tmp_path / 'resumed'}",
                  f"hydra.run.dir={out}")  # fmt: skip
    result = subprocess.run(resumed, cwd=REPO, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    before, after = _records(tmp_path / "killed"), _records(tmp_path / "resumed")
    assert [x["step"] for x in before] == list(range(1, kill_at + 1))
    assert [x["step"] for x in after] == list(range(saved_at + 1, 3 * per_epoch + 1))
    epoch0 = [r for x in before if x["epoch"] == 0 for r in x["rows"]]
    assert sorted(epoch0) == train
    seen = [r for x in before if x["epoch"] == 1 and x["step"] <= saved_at for r in x["rows"]]
    rest = [r for x in after if x["epoch"] == 1 for r in x["rows"]]
    assert sorted(seen + rest) == train  # each train row once in epoch 1, across the kill
    lost = next(x for x in before if x["step"] == saved_at + 1)  # trained, then killed
    assert after[0]["rows"] == lost["rows"]  # the same order goes on
    epoch2 = [r for x in after if x["epoch"] == 2 for r in x["rows"]]
    assert sorted(epoch2) == train and epoch2 != epoch0


@pytest.mark.slow
def test_product_matching_trains_from_the_stream(tmp_path):
    """The other pipeline, unchanged, from the command line: each epoch trains on the rows of
    its training folds once, in a new order, less the one partial batch (data.drop_last)."""
    from tests.conftest import REPO, compose_config
    from tests.pipelines import TINY, cli, env

    common = [
        "data.store_kind=shards", "data.stream=true", "data.num_workers=2",
        "+trainer.limit_train_batches=1.0", "trainer.max_epochs=2",
        "eval_at_init=false", "test=false",
        "+callbacks.record._target_=tests.shared.data.test_streaming.RecordRows",
    ]  # fmt: skip
    cfg = compose_config("matching", [*TINY["matching"], *common[:3]], tmp_path / "probe",
                         data_dir=tmp_path / "data")  # fmt: skip
    train = _train_rows(cfg)
    record = tmp_path / "rows"
    cmd = cli("matching", tmp_path, *common, f"+callbacks.record.path={record}")
    environment = {**env(), "PYTHONPATH": os.pathsep.join([str(REPO), env().get("PYTHONPATH", "")])}
    result = subprocess.run(cmd, cwd=REPO, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    epochs = [[r for x in _records(record) if x["epoch"] == e for r in x["rows"]] for e in (0, 1)]
    whole = len(train) // cfg.data.batch_size * cfg.data.batch_size
    for rows in epochs:
        assert len(rows) == len(set(rows)) == whole and set(rows) <= set(train)
    assert epochs[0] != epochs[1]
