"""Sweeps through the real command line: a local -m sweep, and Optuna studies in sqlite."""

import optuna
import pytest
import torch
from omegaconf import OmegaConf

from tests.pipelines import cli, run, sweep_dir

QUICK = ["test=false", "eval_at_init=false", "logger=none"]
METRIC = {"ssl": "val/knn_top1@20", "matching": "val/f1"}


def best_score(job_dir):
    """The monitored checkpoint's best score, read from the job's own last.ckpt."""
    state = torch.load(job_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    scores = [
        v["best_model_score"]
        for k, v in state["callbacks"].items()
        if k.startswith("ModelCheckpoint") and v.get("monitor")
    ]
    return float(scores[0])


def test_local_multirun_runs_every_value(tmp_path):
    out = run(cli("ssl", tmp_path, "seed=0,1", *QUICK, multirun=True))
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = sweep_dir("ssl", tmp_path)
    for num, seed in ((0, 0), (1, 1)):
        job = sweep / str(num)
        assert f"seed={seed}" in OmegaConf.load(job / ".hydra" / "overrides.yaml")
        assert (job / "checkpoints" / "last.ckpt").is_file()
    assert (sweep / "multirun.yaml").is_file()


def optuna_sweep(pipeline, tmp_path, n_trials, *again):
    """`python <pipeline>/run.py hparams_search=<pipeline>_optuna` as the README has it (no
    -m: the search config sets multirun mode), plus `again` (the README's study resume)."""
    out = run(
        cli(
            pipeline,
            tmp_path,
            f"hparams_search={pipeline}_optuna",
            f"hydra.sweeper.n_trials={n_trials}",
            *QUICK,
            *again,
        )
    )
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = sweep_dir(pipeline, tmp_path)
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    return sweep, optuna.load_study(study_name=f"{pipeline}_optuna", storage=storage)


@pytest.mark.parametrize("pipeline", ["ssl", pytest.param("matching", marks=pytest.mark.slow)])
def test_optuna_best_value_is_the_best_jobs_metric(tmp_path, pipeline):
    sweep, study = optuna_sweep(pipeline, tmp_path, 3)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    jobs = {}
    for num in range(3):
        record = OmegaConf.load(sweep / str(num) / "job_return.yaml")
        assert record.status == "COMPLETED"
        jobs[num] = record.return_value
        # what run() returned is the monitored metric's best value in that job
        assert record.return_value == pytest.approx(best_score(sweep / str(num)))
        assert trials[num].value == pytest.approx(record.return_value)
    assert study.best_value == pytest.approx(max(jobs.values()))
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.best_value == pytest.approx(study.best_value)
    assert (
        OmegaConf.load(sweep / "0" / ".hydra" / "config.yaml").optimized_metric == METRIC[pipeline]
    )


@pytest.mark.slow
def test_optuna_sweep_resumes_its_study_in_new_job_dirs(tmp_path):
    sweep, _ = optuna_sweep("ssl", tmp_path, 2)
    first = {p: p.stat().st_mtime_ns for p in sweep.glob("*/job_return.yaml")}
    _, study = optuna_sweep("ssl", tmp_path, 2, f"hydra.sweep.dir={sweep}")
    assert len(study.trials) == 4
    assert {p: p.stat().st_mtime_ns for p in first} == first  # earlier trials untouched
    assert sorted(p.parent.name for p in sweep.glob("*/job_return.yaml")) == [
        "0",
        "1",
        "resume2_0",
        "resume2_1",
    ]
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 4  # no repeats


@pytest.mark.slow
def test_local_submitit_launcher_runs_jobs_as_processes(tmp_path):
    out = run(cli("matching", tmp_path, "hydra/launcher=local", "seed=0,1", *QUICK, multirun=True))
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = sweep_dir("matching", tmp_path)
    records = [OmegaConf.load(sweep / str(n) / "job_return.yaml") for n in (0, 1)]
    assert [r.status for r in records] == ["COMPLETED", "COMPLETED"]
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2
