"""Real SLURM (the single-node cluster of .ci/slurm.sh): multiruns, preemption, failures.

Run with `.ci/run_slurm` (starts the cluster, runs `pytest -m slurm`, stops it) or, with the
cluster up, `python -m pytest -m slurm tests/slurm`. Skipped when no cluster answers.
"""

import os
import re
import shutil
import subprocess
import time

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import REPO
from tests.pipelines import LOG_NAMES, cli, env, run, sweep_dir

pytestmark = pytest.mark.slurm

# One core and 2 GB per job: the test cluster has two cores. With a 10-minute limit submitit
# counts every USR2 as a timeout, which max_num_timeout=3 (the launcher default) allows.
SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=10",
]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if shutil.which("sinfo") is None:
        pytest.skip("no SLURM client (sinfo); start the test cluster with .ci/slurm.sh start")
    if "SLURM_CONF" not in os.environ:
        line = subprocess.run(
            ["bash", str(REPO / ".ci" / "slurm.sh"), "env"], capture_output=True, text=True
        ).stdout.strip()
        conf = line.removeprefix("export SLURM_CONF=")
        if line.startswith("export SLURM_CONF=") and os.path.isfile(conf):
            os.environ["SLURM_CONF"] = conf
    try:
        states = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15
        )
    except subprocess.TimeoutExpired:
        pytest.skip("sinfo timed out: the SLURM controller does not answer")
    if states.returncode != 0 or not {"idle", "mixed", "allocated"} & set(states.stdout.split()):
        pytest.skip(
            f"no usable SLURM node ({states.stdout.strip() or states.stderr.strip()}); "
            "start the test cluster with .ci/slurm.sh start"
        )


def diagnostics(driver: subprocess.Popen, sweep) -> str:
    """The driver's output and the tails of the jobs' logs, for a failure message."""
    output = driver.communicate(timeout=30)[0] or ""
    logs = [
        f"--- {log.name}:\n{log.read_text()[-2000:]}"
        for log in sorted((sweep / ".submitit").glob("*/*_log.*"))
    ]
    return "\n".join([f"--- driver (rc {driver.returncode}):\n{output[-3000:]}", *logs])


def record(job_dir):
    return OmegaConf.load(job_dir / "job_return.yaml")


@pytest.mark.parametrize("pipeline", ["ssl", "matching"])
def test_preempted_job_is_requeued_and_ends_like_the_uninterrupted_one(tmp_path, pipeline):
    """Two identical jobs; job 0 gets the preemption signal after its first checkpoint, saves
    last.ckpt where it is (mid-epoch as a rule) and continues from there when requeued."""
    cmd = cli(
        pipeline,
        tmp_path,
        *SLURM,
        "trainer.max_epochs=6",
        "+trainer.limit_train_batches=3",
        "data.batch_size=4",  # 3 steps per epoch: the signal can land mid-epoch
        "test=false",
        "+replica=preempted,reference",
        multirun=True,
    )
    sweeps = tmp_path / "logs" / LOG_NAMES[pipeline] / "multiruns"
    driver = subprocess.Popen(
        cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    found = []
    try:
        deadline = time.time() + 400
        while driver.poll() is None and time.time() < deadline:
            if found := list(sweeps.glob("*/0/checkpoints/last.ckpt")):
                break
            time.sleep(0.2)
        sweep = next(sweeps.glob("*"), tmp_path / "no sweep directory")
        last = sweep / "0" / "checkpoints" / "last.ckpt"
        if not found:
            driver.kill()
            for job in (sweep / ".submitit").glob("*_*"):  # leave the cluster free
                subprocess.run(["scancel", job.name], check=False)
            pytest.fail(f"job 0 wrote no checkpoint in time\n{diagnostics(driver, sweep)}")
        job_id = next(d.name for d in (sweep / ".submitit").iterdir() if d.name.endswith("_0"))
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        output, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output[-3000:]

    logs = sweep / ".submitit" / job_id
    assert "DUE TO JOB REQUEUE" in (logs / f"{job_id}_0_log.err").read_text()
    assert (logs / f"{job_id}_0_log.out").read_text().count("Starting with JobEnvironment") == 2
    run_log = (sweep / "0" / "run.log").read_text()
    # last.ckpt saved at the signal (the end of that step, or of its epoch), then requeued
    assert "handing the signal to the scheduler" in run_log
    assert f"Resuming from {last}" in run_log
    preempted, reference = record(sweep / "0"), record(sweep / "1")
    assert preempted.status == reference.status == "COMPLETED"
    assert preempted.return_value == reference.return_value
    a, b = (
        torch.load(sweep / n / "checkpoints" / "last.ckpt", weights_only=True) for n in ("0", "1")
    )
    assert a["global_step"] == b["global_step"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])


def test_a_failing_job_fails_the_sweep_with_its_error(tmp_path):
    out = run(
        cli("ssl", tmp_path, *SLURM, "data.split_by=instance,bogus", "test=false", multirun=True)
    )
    assert out.returncode != 0
    assert "data.split_by must be 'instance', 'group' or 'class', got 'bogus'" in out.stderr
    sweep = sweep_dir("ssl", tmp_path)
    assert record(sweep / "0").status == "COMPLETED"
    assert record(sweep / "1").status == "FAILED"


def test_a_sweep_whose_jobs_all_fail_reports_every_error(tmp_path):
    out = run(cli("ssl", tmp_path, *SLURM, "data.split_by=bogus1,bogus2", multirun=True))
    assert out.returncode != 0
    text = out.stdout + out.stderr  # Hydra logs to stdout, tracebacks go to stderr
    assert "2 of 2 jobs failed" in text
    for bad in ("bogus1", "bogus2"):
        assert (
            f"FAILED: ValueError: data.split_by must be 'instance', 'group' or 'class', got '{bad}'"
            in text
        )


def test_a_mismatched_launcher_is_refused_before_submission(tmp_path):
    out = run(cli("ssl", tmp_path, *SLURM, "hydra.launcher.tasks_per_node=2", multirun=True))
    assert out.returncode != 0
    assert "tasks_per_node=2 but trainer.devices=1" in out.stderr
    assert not list((tmp_path / "logs").rglob(".submitit"))  # nothing was submitted


def test_ddp_over_two_slurm_tasks(tmp_path):
    """trainer.devices=2 -> two SLURM tasks; Lightning joins them and starts no processes."""
    out = run(
        cli("ssl", tmp_path, *SLURM, "trainer=ddp_cpu", "trainer.strategy=ddp", multirun=True)
    )
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = sweep_dir("ssl", tmp_path)
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.err"))
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs and "GLOBAL_RANK: 1, MEMBER: 2/2" in logs
    assert record(sweep / "0").status == "COMPLETED"
    names = sorted(p.name for p in (sweep / "0" / "checkpoints").iterdir())
    # rank 0 alone writes: one best checkpoint (whichever epoch validated best) and last.ckpt
    assert len(names) == 2 and re.fullmatch(r"epoch_\d{3}\.ckpt", names[0]), names
    assert names[1] == "last.ckpt"
