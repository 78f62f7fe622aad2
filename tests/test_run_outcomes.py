"""What a run leaves behind, through the real command line with the output piped to a file
as a cluster job sees it: the last epoch validated and checkpointed whatever the cadence,
every evaluation kept, test figures of the held-out split at the validation-chosen
checkpoint (and threshold), plain progress lines, and a non-zero exit when stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from shared.run_loading import load_run
from tests.conftest import REPO
from tests.pipelines import cli, env, run, run_dir


def test_ssl_run_validates_its_last_epoch_and_tests_the_held_out_split(tmp_path):
    # 3 epochs, validation every 2: Lightning alone would skip epoch 3 entirely.
    out = run(cli("ssl", tmp_path, "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2"))
    assert out.returncode == 0, out.stderr[-3000:]
    run_path = run_dir("ssl", tmp_path, "dino")

    last = torch.load(run_path / "checkpoints" / "last.ckpt", weights_only=True)
    per_epoch = last["global_step"] // 3
    assert last["epoch"] == 2 and per_epoch > 0 and last["global_step"] == 3 * per_epoch
    history = json.loads((run_path / "knn_history.json").read_text())
    expected = [(0, 0), (1, 2 * per_epoch), (2, 3 * per_epoch)]  # untrained, epochs 2 and 3
    assert [(h["epoch"], h["step"]) for h in history] == expected

    results = json.loads((run_path / "results.json").read_text())
    best = torch.load(results["best_checkpoint"], weights_only=True)
    (monitor,) = [v for k, v in best["callbacks"].items() if v.get("monitor")]
    val_scores = [h["knn_top1@20"] for h in history[1:]]
    assert abs(float(monitor["best_model_score"]) - max(val_scores)) < 1e-6  # chosen on val
    assert abs(results["optimized_metric"]["val/knn_top1@20"] - max(val_scores)) < 1e-6
    assert set(results["test"]) >= {"test/knn_top1@20", "test/knn_top1@10"}
    assert set(results["untrained_test"]) == set(results["test"])

    # The test queries are the held-out split, not the validation queries.
    loaded = load_run(run_path)
    dm = loaded.datamodule
    dm.setup()
    assert len(dm.test_indices) and not set(dm.test_indices) & set(dm.val_indices)

    log = (run_path / "run.log").read_text()
    for line in ("untrained val:", "epoch 3/3: train/loss=", "epoch 3 val: val/knn_top1@10="):
        assert line in log, line
    assert f"Run finished: {run_path} | best checkpoint: {results['best_checkpoint']}" in log
    console = out.stdout + out.stderr
    announced = console.count("Built image store") + console.count("Reusing image store")
    assert announced == 1  # one line per store, not one per stage that opens it
    for noise in ("swigfaiss_avx512", "Total FLOPs", "💡 Tip", "DataLoader 1"):
        assert noise not in console, noise


def test_matching_test_fold_is_scored_at_the_threshold_chosen_on_validation(tmp_path):
    out = run(cli("matching", tmp_path, "trainer.max_epochs=3"))
    assert out.returncode == 0, out.stderr[-3000:]
    run_path = run_dir("matching", tmp_path, "dolg")
    results = json.loads((run_path / "results.json").read_text())
    test = results["test"]

    loaded = load_run(run_path)  # the best checkpoint, as serve / infer load it
    state = loaded.chosen  # the checkpoint's named entry
    assert abs(test["test/threshold"] - state["threshold"]) < 1e-6  # chosen on validation
    assert results["chosen_on_validation"] == state  # and in the run directory
    history = json.loads((run_path / "matching_eval.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 0, 1, 2]  # untrained, then every epoch

    # The same figure recomputed outside the trainer: test-fold embeddings, one threshold.
    from shared.retrieval.threshold import sweep_embeddings

    dm = loaded.datamodule
    dm.setup()
    assert set(dm.folds[dm.test_indices]) == {dm.test_fold} and dm.test_fold != dm.fold
    rows = torch.as_tensor(dm.test_indices)
    with torch.no_grad():
        emb = loaded.module.embed(dm.store.images[rows]).numpy()
    labels = dm.store.labels[rows].numpy()
    settings = loaded.config.callbacks.matching_eval
    result, _, _ = sweep_embeddings(
        emb, labels, np.array([state["threshold"]]), settings.k, settings.min2
    )
    assert abs(test["test/f1"] - result.best_f1) < 1e-6


def test_a_run_stopped_by_sigterm_exits_non_zero(tmp_path):
    cmd = cli("ssl", tmp_path, "trainer.max_epochs=200", "eval_at_init=false")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, text=True)
    logs = tmp_path / "logs" / "ssl" / "dino" / "runs"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list(logs.glob("*/checkpoints/last.ckpt")):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode not in (0, None), stdout[-2000:]
    assert not list(logs.glob("*/results.json"))  # no figures of a run that did not finish


@pytest.mark.parametrize(
    "pipeline, override, message",
    [
        ("ssl", "data.image_size=0", "data.image_size=0: expected an integer >= 1"),
        ("ssl", "data.batch_size=abc", "data.batch_size='abc': expected an integer >= 1"),
        ("matching", "trainer.max_epochs=1.5", "trainer.max_epochs=1.5: expected an integer"),
        (
            "matching",
            "data.source.csv_path=/nowhere.csv",
            "data.source.csv_path='/nowhere.csv' does not exist",
        ),
    ],
)
def test_bad_values_fail_early_naming_the_key(tmp_path, pipeline, override, message):
    out = run(cli(pipeline, tmp_path, override))
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
def test_a_moved_key_names_its_new_one(tmp_path):
    """The README's older `data.csv_path=...` (postings became a data source) is refused with
    the key to write instead, before Hydra's own "not in struct"."""
    out = run(cli("matching", tmp_path, "data.csv_path=/a.csv"))
    assert out.returncode != 0
    assert "data.csv_path has moved" in out.stderr and "write data.source.csv_path=" in out.stderr


def _csv_rows(path):
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_a_run_killed_and_restarted_keeps_its_metrics_history(tmp_path):
    """kill -9 after the second checkpoint, restart on the same run directory: metrics.csv
    ends equal to an uninterrupted run's (no row lost, none duplicated)."""
    epochs = "trainer.max_epochs=4"
    reference = run(cli("ssl", tmp_path / "ref", epochs))
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = _csv_rows(run_dir("ssl", tmp_path / "ref", "dino") / "csv" / "metrics.csv")

    cmd = cli("ssl", tmp_path / "killed", epochs)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL)
    runs = tmp_path / "killed" / "logs" / "ssl" / "dino" / "runs"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        ckpt = list(runs.glob("*/checkpoints/last.ckpt"))
        if ckpt and torch.load(ckpt[0], weights_only=True)["epoch"] >= 1:
            break
        time.sleep(0.2)
    time.sleep(1.0)  # into epoch 3: rows are logged after the checkpoint
    proc.kill()
    proc.wait()
    path = run_dir("ssl", tmp_path / "killed", "dino")
    restarted = run(cli("ssl", tmp_path / "killed", epochs, f"hydra.run.dir={path}"))
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "Resuming from" in restarted.stdout + restarted.stderr

    got = _csv_rows(path / "csv" / "metrics.csv")
    assert [r["epoch"] for r in got] == [r["epoch"] for r in expected]
    assert got == expected
