"""shared/launch.py: the launcher check before submission, and the per-job report."""

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf

from shared.launch import JobReport, LaunchCheck, LaunchConfigError, format_report, planned_jobs
from tests.conftest import CONF


@pytest.fixture
def multirun_cfg():
    """Compose like `run.py -m ...` (sweep overrides kept for the sweeper, not applied)."""

    def make(*overrides: str, config_name: str = "ssl"):
        gh = GlobalHydra.instance()
        return gh.hydra.compose_config(
            config_name, list(overrides), run_mode=RunMode.MULTIRUN, with_log_configuration=False
        )

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield make
    GlobalHydra.instance().clear()


def check(cfg, scheduler="slurm"):
    LaunchCheck(scheduler).on_multirun_start(cfg)


def test_matching_launcher_passes_and_sees_every_job(multirun_cfg):
    cfg = multirun_cfg("hydra/launcher=slurm", "seed=0,1", "module.base_lr=0.1,0.2")
    assert [job for job, _ in planned_jobs(cfg)] == [
        ["seed=0", "module.base_lr=0.1"],
        ["seed=0", "module.base_lr=0.2"],
        ["seed=1", "module.base_lr=0.1"],
        ["seed=1", "module.base_lr=0.2"],
    ]
    check(cfg)
    launcher = cfg.hydra.launcher
    assert (launcher.tasks_per_node, launcher.nodes, launcher.gpus_per_node) == (1, 1, None)
    assert cfg.trainer.plugins[0].auto_requeue is False  # submitit alone requeues


def test_gpu_ddp_requests_one_task_and_one_gpu_per_device(multirun_cfg):
    cfg = multirun_cfg(
        "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"
    )
    check(cfg)
    launcher = cfg.hydra.launcher
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (8, 8, 2)
    assert launcher.mem_gb == 8 * cfg.slurm_mem_gb_per_task  # --mem per node: 8 tasks' worth


def test_dry_run_prints_the_resolved_request_and_submits_nothing(multirun_cfg, capsys):
    cfg = multirun_cfg(
        "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "seed=0,1", "dry_run=true"
    )
    with pytest.raises(SystemExit) as stop:
        check(cfg)
    assert stop.value.code == 0
    text = capsys.readouterr().out
    per_task = cfg.slurm_mem_gb_per_task
    for line in ("2 job(s)", "tasks_per_node: 4", "gpus_per_node: 4", f"mem_gb: {4 * per_task}"):
        assert line in text, text
    assert "0: trainer=ddp trainer.devices=4 seed=0" in text and "1: " in text


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["hydra.launcher.tasks_per_node=2"], "tasks_per_node=2 but trainer.devices=1"),
        (["hydra.launcher.nodes=2"], "nodes=2 but trainer.num_nodes=1"),
        (["trainer=ddp_cpu"], "trainer.strategy=ddp_fork starts its own processes"),
        (
            ["trainer=gpu", "hydra.launcher.gpus_per_node=2"],
            "gpus_per_node=2 but trainer.devices=1",
        ),
        (["trainer.accelerator=auto"], "trainer.accelerator=auto"),
        (["hydra.launcher.timeout_min=2"], "signal_delay_s=120 is not below the time limit"),
        (["hydra.launcher.timeout_min=10", "hydra.launcher.max_num_timeout=0"], "max_num_timeout"),
    ],
)
def test_mismatch_is_refused_before_submission(multirun_cfg, overrides, expected):
    cfg = multirun_cfg("hydra/launcher=slurm", *overrides)
    with pytest.raises(LaunchConfigError, match="nothing was submitted") as err:
        check(cfg)
    assert expected in str(err.value)
    assert err.value.code != 0  # a SystemExit Hydra's callback runner does not swallow


def test_a_launcher_without_multirun_is_refused(multirun_cfg):
    with pytest.raises(LaunchConfigError, match="add -m"):
        LaunchCheck("slurm").on_run_start(multirun_cfg("hydra/launcher=slurm"))


def test_a_swept_device_count_is_checked_per_job(multirun_cfg):
    # The request comes from the base config: trainer=ddp's 4 devices.
    cfg = multirun_cfg("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4,2")
    with pytest.raises(LaunchConfigError) as err:
        check(cfg)
    text = str(err.value)
    assert "job trainer=ddp trainer.devices=2: hydra.launcher.tasks_per_node=4" in text
    assert "trainer.devices=4:" not in text  # the job that matches the request passes


def test_local_launcher_needs_a_process_starting_strategy_for_several_devices(multirun_cfg):
    check(multirun_cfg("hydra/launcher=local", "trainer=ddp_cpu"), "local")
    cfg = multirun_cfg("hydra/launcher=local", "trainer=ddp_cpu", "trainer.strategy=ddp")
    with pytest.raises(LaunchConfigError, match="re-run the job's command line"):
        check(cfg, "local")


def test_job_report_records_value_and_error(tmp_path):
    def job_cfg(num):
        return OmegaConf.create(
            {
                "hydra": {
                    "job": {"num": num, "id": str(num)},
                    "runtime": {"output_dir": str(tmp_path / str(num))},
                }
            }
        )

    ok, bad = JobReturn(), JobReturn()
    ok.overrides, ok.status, ok.return_value = ["seed=0", "x=1"], JobStatus.COMPLETED, 0.5
    bad.overrides, bad.status = ["seed=1", "x=1"], JobStatus.FAILED
    bad.return_value = ValueError("data.val_fraction must be in (0, 1), got 0.0")
    report = JobReport()
    report.on_job_end(job_cfg(0), ok)
    report.on_job_end(job_cfg(1), bad)
    assert OmegaConf.load(tmp_path / "0" / "job_return.yaml").return_value == 0.5
    from shared.launch import read_job_records

    text = format_report(read_job_records(tmp_path))
    assert "job 0 [seed=0] returned 0.5" in text
    assert "job 1 [seed=1] FAILED: ValueError: data.val_fraction must be in (0, 1)" in text
