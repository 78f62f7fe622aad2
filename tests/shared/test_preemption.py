"""A preemption signal in the middle of an epoch: last.ckpt is saved at the end of that step,
then the scheduler's handler runs; the requeued run continues the same epoch and ends bit for
bit like the uninterrupted one. submitit's handler is stood in for by one that exits as it does
after requeueing; the real one runs in the SLURM stage (tests/slurm)."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from lightning import Callback

from shared.callbacks.preemption import preemption_signal
from tests.conftest import TINY_SYNTHETIC, compose_config
from tests.pipelines import TINY
from tests.tracking.runs import run_in_process

EPOCHS = 3


class SignalAt(Callback):
    """Sends this process the preemption signal as global step `step` starts."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), preemption_signal())


class KillAt(Callback):
    """Stops the process (as a kill would) as global step `step` starts."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise SystemExit(-9)


class Scheduler:
    """submitit's part: record the call and what last.ckpt held then, exit like a requeue."""

    def __init__(self, last) -> None:
        self.last, self.calls = last, []

    def __call__(self, signum, frame) -> None:
        saved = torch.load(self.last, weights_only=True) if self.last.is_file() else None
        self.calls.append((signum, saved and saved["global_step"]))
        raise SystemExit(-1)


@pytest.fixture
def scheduler_handler():
    before = signal.getsignal(preemption_signal())
    yield lambda handler: signal.signal(preemption_signal(), handler)
    signal.signal(preemption_signal(), before)


PIPELINES = {  # small batches: a few per epoch
    "ssl": ("ssl", [*TINY["ssl"], "data.batch_size=4"]),
    "matching": ("matching", [*TINY["matching"], "data.batch_size=4", "data.m_per_class=2"]),
}


@pytest.mark.parametrize(
    "pipeline, when", [("ssl", "mid-epoch"), ("matching", "mid-epoch"), ("ssl", "last step")]
)
def test_preempted_mid_epoch_resumes_the_same_epoch_bit_for_bit(
    tmp_path, scheduler_handler, pipeline, when
):
    config, tiny = PIPELINES[pipeline]
    overrides = [
        *tiny,
        f"trainer.max_epochs={EPOCHS}",
        "trainer.check_val_every_n_epoch=1",
        "test=false",
        "eval_at_init=false",
    ]
    data = tmp_path / "data"

    def run(name, *extra):
        cfg = compose_config(config, [*overrides, *extra], tmp_path / name, data_dir=data)
        return run_in_process(cfg), tmp_path / name / "run" / "checkpoints" / "last.ckpt"

    reference, reference_last = run("reference")
    per_epoch = torch.load(reference_last, weights_only=True)["global_step"] // EPOCHS
    assert per_epoch >= 3
    if when == "mid-epoch":  # during epoch 1's second step: saved at its end
        step, saved_at = per_epoch + 1, per_epoch + 2
    else:  # during epoch 0's last step: handed over once its validation wrote last.ckpt
        step, saved_at = per_epoch - 1, per_epoch

    last = tmp_path / "preempted" / "run" / "checkpoints" / "last.ckpt"
    scheduler = Scheduler(last)
    scheduler_handler(scheduler)
    trigger = [
        "+callbacks.signal_at._target_=tests.shared.test_preemption.SignalAt",
        f"+callbacks.signal_at.step={step}",
    ]
    with pytest.raises(SystemExit):
        run("preempted", *trigger)
    # saved at the end of the signalled step, before the scheduler's handler ran, mid-epoch
    assert scheduler.calls == [(preemption_signal(), saved_at)]

    resumed, resumed_last = run("preempted")  # the requeued job: same command, same folder
    assert resumed == reference
    a, b = (torch.load(p, weights_only=True) for p in (resumed_last, reference_last))
    assert a["global_step"] == b["global_step"] == EPOCHS * per_epoch
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])


def test_a_run_without_the_signal_leaves_the_schedulers_handler_in_place(
    tmp_path, scheduler_handler
):
    """No signal: nothing extra is saved, the scheduler's handler is never called and is back
    in place once training ends (a signal during the test phase reaches it directly)."""
    scheduler = Scheduler(tmp_path / "unused.ckpt")
    scheduler_handler(scheduler)
    cfg = compose_config(
        "ssl",
        [*TINY_SYNTHETIC, "trainer.max_epochs=1", "+trainer.limit_train_batches=1", "test=false"],
        tmp_path,
    )
    run_in_process(cfg)
    assert scheduler.calls == []
    assert signal.getsignal(preemption_signal()) is scheduler


@pytest.mark.parametrize("every_n_train_steps", [2, None])
def test_killed_run_resumes_from_its_last_checkpoint_bit_for_bit(tmp_path, every_n_train_steps):
    """last.ckpt mid-epoch (`callbacks.last_checkpoint.every_n_train_steps`, long epochs) or
    at the validation after an epoch's last step (the default)."""
    overrides = [
        *TINY["ssl"],
        "data.batch_size=4",
        f"trainer.max_epochs={EPOCHS}",
        f"callbacks.last_checkpoint.every_n_train_steps={every_n_train_steps or 'null'}",
        "trainer.check_val_every_n_epoch=1",
        "test=false",
        "eval_at_init=false",
    ]
    data = tmp_path / "data"

    def run(name, *extra):
        cfg = compose_config("ssl", [*overrides, *extra], tmp_path / name, data_dir=data)
        return run_in_process(cfg), tmp_path / name / "run" / "checkpoints" / "last.ckpt"

    reference, reference_last = run("reference")
    (best,) = (tmp_path / "reference" / "run" / "checkpoints").glob("epoch_*.ckpt")
    best = torch.load(best, weights_only=True)  # saved at the end of an epoch
    per_epoch = best["global_step"] // (best["epoch"] + 1)
    assert per_epoch % 2 == 1  # so that some step-2 checkpoint falls inside an epoch
    with pytest.raises(SystemExit):
        run("killed", "+callbacks.kill_at._target_=tests.shared.test_preemption.KillAt",
            f"+callbacks.kill_at.step={per_epoch + 2}")  # fmt: skip
    saved = torch.load(tmp_path / "killed" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    # every 2 steps: epoch 1, mid-way; else the end of epoch 0 (before its epoch-end hooks)
    assert saved["global_step"] == (per_epoch + 1 if every_n_train_steps else per_epoch)

    resumed, resumed_last = run("killed")
    assert resumed == reference
    a, b = (torch.load(p, weights_only=True) for p in (resumed_last, reference_last))
    assert a["global_step"] == b["global_step"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])


def test_a_resumed_run_reports_the_untrained_figures_it_scored_before_the_kill(tmp_path):
    """results.json is written at the end; the untrained network's test figures, scored when
    the run first started, reach it through untrained_test.json."""
    import json

    overrides = [*TINY["ssl"], "data.batch_size=4", "trainer.max_epochs=2",
                 "trainer.check_val_every_n_epoch=1", "test=true", "eval_at_init=true"]  # fmt: skip
    cfg = compose_config("ssl", [*overrides, "+callbacks.kill_at._target_="
                         "tests.shared.test_preemption.KillAt", "+callbacks.kill_at.step=3"],
                         tmp_path)  # fmt: skip
    with pytest.raises(SystemExit):
        run_in_process(cfg)
    run = tmp_path / "run"
    scored = json.loads((run / "untrained_test.json").read_text())
    assert not (run / "results.json").exists() and "test/knn_top1@20" in scored
    run_in_process(compose_config("ssl", overrides, tmp_path))
    results = json.loads((run / "results.json").read_text())
    assert results["untrained_test"] == scored and set(scored) == set(results["test"])
