"""Hydra callbacks for launching jobs: check before submitting, report after, resume sweeps.

Registered under `hydra.callbacks` by conf/hydra/launcher/{slurm,local}.yaml and
conf/hparams_search/*.yaml (Hydra only takes launcher and sweeper plugins from the
`hydra_plugins` package; callbacks may live anywhere):

- `LaunchCheck`: each job's trainer against the one resource request submitit makes for the
  whole sweep (tasks per node = devices, nodes = num_nodes, GPUs, strategy), before anything
  is submitted; a launcher chosen without -m is refused too.
- `JobReport`: every job writes `job_return.yaml` (its return value or its error) into its
  directory; when a sweep ends, or fails, the driver prints every job's outcome, not only the
  first failure Hydra re-raises.
- `ResumableStudy`: an Optuna sweep started again on the same sweep dir continues its study;
  its new jobs get directories of their own instead of resuming another trial's last.ckpt.
"""

from __future__ import annotations

import atexit
import logging
import pickle
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from shared.atomic import write_text

log = logging.getLogger(__name__)

SCHEDULERS = ("slurm", "local")
# Strategies that start their own processes: under SLURM every device is already a task.
PROCESS_STARTING = ("spawn", "fork", "notebook")


class LaunchConfigError(SystemExit):
    """The launcher's resource request does not fit a job's trainer; nothing was submitted.

    A SystemExit (message to stderr, exit status 1): Hydra turns an Exception raised in a
    callback into a warning and would go on to submit.
    """


def _strategy_name(strategy: Any) -> str:
    if isinstance(strategy, (dict, DictConfig)):
        return f"{strategy.get('_target_', '')} {strategy.get('start_method', '')}".strip()
    return str(strategy)


def check_job(launcher: DictConfig, trainer: DictConfig, scheduler: str) -> list[str]:
    """What is wrong with running `trainer` under `launcher` (resolved values); [] if nothing."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    problems = []
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes", 1)
    accelerator = str(trainer.get("accelerator"))
    strategy = _strategy_name(trainer.get("strategy"))
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        return [f"trainer.devices={devices!r}: a launcher needs a device count (an int >= 1)"]
    spawns = any(word in strategy for word in PROCESS_STARTING)
    gpus = launcher.get("gpus_per_node") or 0
    if accelerator == "auto":
        problems.append(
            "trainer.accelerator=auto: pick trainer=cpu|ddp_cpu|gpu|ddp so the "
            "launcher knows whether to request GPUs"
        )
    elif accelerator in ("gpu", "cuda") and gpus != devices:
        problems.append(
            f"hydra.launcher.gpus_per_node={gpus or None} but trainer.devices={devices} GPUs"
        )
    elif accelerator == "cpu" and gpus:
        problems.append(
            f"hydra.launcher.gpus_per_node={gpus} for a CPU run (trainer.accelerator=cpu)"
        )

    if scheduler == "slurm":
        if launcher.tasks_per_node != devices:
            problems.append(
                f"hydra.launcher.tasks_per_node={launcher.tasks_per_node} but trainer.devices="
                f"{devices}: SLURM must start one task per device (Lightning then starts no "
                "processes of its own); leave tasks_per_node at ${trainer.devices}"
            )
        if launcher.nodes != nodes:
            problems.append(
                f"hydra.launcher.nodes={launcher.nodes} but trainer.num_nodes="
                f"{nodes}; leave nodes at ${{trainer.num_nodes}}"
            )
        if devices * nodes > 1 and spawns:
            problems.append(
                f"trainer.strategy={strategy} starts its own processes, but under "
                "SLURM each device is already a task: use trainer.strategy=ddp "
                "(trainer=ddp)"
            )
        limit_s = launcher.timeout_min * 60
        if launcher.signal_delay_s >= limit_s:
            problems.append(
                f"hydra.launcher.signal_delay_s={launcher.signal_delay_s} is not "
                f"below the time limit ({launcher.timeout_min} min): the job would "
                "be signalled at once"
            )
        if launcher.timeout_min <= 10 and launcher.max_num_timeout < 1:
            problems.append(
                "hydra.launcher.max_num_timeout=0 with timeout_min <= 10: submitit "
                "counts every preemption signal as a timeout, so no job would be "
                "requeued; set max_num_timeout >= 1"
            )
    else:
        if launcher.tasks_per_node != 1 or launcher.nodes != 1:
            problems.append(
                "the local launcher runs one task on one node per job: set "
                "hydra.launcher.tasks_per_node=1 and nodes=1"
            )
        if nodes != 1:
            problems.append(f"trainer.num_nodes={nodes}: the local launcher has one node")
        if devices > 1 and not spawns:
            problems.append(
                f"trainer.devices={devices} with strategy={strategy}: Lightning's "
                "ddp would re-run the job's command line for its other ranks; use "
                "trainer=ddp_cpu (ddp_fork) or trainer.strategy=ddp_fork|ddp_spawn"
            )
    return problems


def planned_jobs(config: DictConfig) -> list[tuple[list[str], DictConfig]]:
    """(overrides, config) of every job a basic sweep will launch; for other sweepers (which
    choose values as they go) the sweep's base config alone."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    if not sweeper.get("_target_", "").endswith("BasicSweeper"):
        return [([], config)]
    loader = GlobalHydra.instance().config_loader()
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(params + task)
    batches = BasicSweeper.split_arguments(parsed, None)
    jobs = batches[0] if batches else [[]]
    return [(list(job), loader.load_sweep_config(config, list(job))) for job in jobs]


class LaunchCheck(Callback):
    """Refuses a sweep whose launcher request does not fit a job's trainer, before submitting.

    submitit submits one job array with one resource request (resolved from the sweep's base
    config), so every job's `trainer.devices` / `num_nodes` / accelerator must match it.
    """

    def __init__(self, scheduler: str) -> None:
        if scheduler not in SCHEDULERS:
            raise ValueError(
                f"LaunchCheck scheduler must be one of {SCHEDULERS}, got {scheduler!r}"
            )
        self.scheduler = scheduler

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        raise LaunchConfigError(
            f"hydra/launcher={self.scheduler} launches multiruns only: add -m (without it the "
            "run would start here, configured for a launcher that never runs it)"
        )

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = config.hydra.launcher
        messages = []
        for overrides, job in planned_jobs(config):
            for problem in check_job(launcher, job.trainer, self.scheduler):
                where = f"job {' '.join(overrides)}: " if overrides else ""
                if f"{where}{problem}" not in messages:
                    messages.append(f"{where}{problem}")
        if messages:
            raise LaunchConfigError(
                f"hydra/launcher={self.scheduler} does not fit the trainer; nothing was "
                "submitted:\n  - " + "\n  - ".join(messages) + "\n(a sweep is one job array "
                "with one resource request, resolved from the base config: sweep "
                "trainer.devices / num_nodes / accelerator in separate multiruns)"
            )
        if config.get("dry_run"):
            print(describe_request(config), flush=True)
            raise SystemExit(0)


def describe_request(config: DictConfig) -> str:
    """The launcher's resolved request and the jobs it would start (`dry_run=true`)."""
    request = OmegaConf.to_container(config.hydra.launcher, resolve=True)
    request.pop("_target_", None)
    jobs = planned_jobs(config)
    lines = [f"{len(jobs)} job(s), each with this request (dry_run: nothing submitted):"]
    lines += [f"  {k}: {v}" for k, v in request.items() if v not in (None, [], {})]
    lines += ["jobs:"] + [
        f"  {i}: {' '.join(o) or '(base config)'}" for i, (o, _) in enumerate(jobs)
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- reporting
JOB_RETURN = "job_return.yaml"


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # tensors, numpy scalars
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)


def job_record(config: DictConfig, job_return: JobReturn) -> dict:
    """What a job returned, or the error it raised, as plain values."""
    record = {
        "num": config.hydra.job.get("num"),
        "id": config.hydra.job.get("id"),
        "overrides": list(job_return.overrides or []),
        "status": job_return.status.name,
    }
    if job_return.status == JobStatus.COMPLETED:
        record["return_value"] = _plain(job_return._return_value)
    else:
        error = job_return._return_value
        record["error"] = f"{type(error).__name__}: {error}"
    return record


def read_job_records(sweep_dir: Path) -> list[dict]:
    """Every job's `job_return.yaml` under `sweep_dir`, plus jobs submitit saw crash outside
    the job function (killed, out of memory, import errors), by job number or id."""
    records = []
    for path in sorted(Path(sweep_dir).rglob(JOB_RETURN)):
        record = OmegaConf.to_container(OmegaConf.load(path))
        record["dir"] = str(path.parent)
        records.append(record)
    for result in sorted(Path(sweep_dir).glob(".submitit/*/*_0_result.pkl")):
        try:
            with open(result, "rb") as f:
                outcome, value = pickle.load(f)
        except Exception:  # noqa: BLE001 (a half-written or foreign pickle: nothing to add)
            continue
        if outcome == "error":
            last = [line for line in str(value).strip().splitlines() if line.strip()][-1:]
            records.append(
                {
                    "num": None,
                    "id": result.parent.name,
                    "overrides": [],
                    "status": "CRASHED",
                    "error": " ".join(last),
                    "dir": str(result.with_name(result.name.replace("_result.pkl", "_log.err"))),
                }
            )
    return records


def format_report(records: list[dict]) -> str:
    """One line per job: number, the overrides that tell it from the others, outcome, dir."""
    listed = [r["overrides"] for r in records if r["overrides"]]
    shared = set.intersection(*map(set, listed)) if len(listed) > 1 else set()
    lines = []
    for r in sorted(records, key=lambda r: (r["num"] is None, r["num"] or 0, str(r["id"]))):
        name = f"job {r['num']}" if r["num"] is not None else f"submitit job {r['id']}"
        own = " ".join(o for o in r["overrides"] if o not in shared)
        what = (
            f"returned {r['return_value']}"
            if r["status"] == "COMPLETED"
            else f"{r['status']}: {r['error']}"
        )
        lines.append(f"  {name}{f' [{own}]' if own else ''} {what}  ({r['dir']})")
    return "\n".join(lines)


class JobReport(Callback):
    """Each job writes its outcome beside its outputs; the sweep prints them all at its end.

    Hydra re-raises only the first failed job of a sweep and skips `on_multirun_end` when it
    does, so the report of a failed sweep is printed when the driver exits.
    """

    def __init__(self) -> None:
        self._sweep_dir: str | None = None

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        out = Path(config.hydra.runtime.output_dir)
        record = OmegaConf.create(job_record(config, job_return))
        write_text(out / JOB_RETURN, OmegaConf.to_yaml(record))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._sweep_dir = str(config.hydra.sweep.dir)
        atexit.register(self._report)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.unregister(self._report)
        self._report()

    def _report(self) -> None:
        if not self._sweep_dir or not Path(self._sweep_dir).is_dir():
            return
        records = read_job_records(Path(self._sweep_dir))
        failed = [r for r in records if r["status"] != "COMPLETED"]
        if failed:
            log.error(
                "%d of %d jobs failed in %s:\n%s",
                len(failed),
                len(records),
                self._sweep_dir,
                format_report(records),
            )
        elif records:
            log.info("%d jobs in %s:\n%s", len(records), self._sweep_dir, format_report(records))


# ------------------------------------------------------------------------------- sweeps
def _sqlite_path(storage: str | None) -> Path | None:
    prefix = "sqlite:///"
    return Path(storage[len(prefix) :]) if storage and storage.startswith(prefix) else None


class ResumableStudy(Callback):
    """Continue an Optuna sweep on its own sweep dir without two trials sharing a job dir.

    The sweeper numbers the jobs of every invocation from 0, so the trials added on a second
    run would land in (and auto-resume from) the directories of the first trials. When the
    study already holds trials, the new jobs go to `resume<n>_<job>` (n = trials so far) and
    the sampler's seed is offset by n.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = config.hydra.sweeper
        if "optuna" not in str(sweeper.get("_target_", "")).lower():
            return
        path = _sqlite_path(sweeper.get("storage"))
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)  # the study is created before any job
        if not path.is_file() or not sweeper.get("study_name"):
            return
        import optuna

        try:
            study = optuna.load_study(study_name=sweeper.study_name, storage=sweeper.storage)
        except KeyError:  # no study of that name in the file yet
            return
        n = len(study.get_trials(deepcopy=False))
        if n == 0:
            return
        subdir = f"resume{n}_${{hydra.job.num}}"
        with read_write(config.hydra), open_dict(config.hydra):
            # Jobs are recomposed from the hydra overrides: the subdir must go there.
            config.hydra.overrides.hydra.append(f"hydra.sweep.subdir={subdir}")
            config.hydra.sweep.subdir = subdir
            # The sampler is built from this config: a fixed seed would repeat the first
            # invocation's random start-up points.
            if sweeper.get("sampler") and sweeper.sampler.get("seed") is not None:
                sweeper.sampler.seed = int(sweeper.sampler.seed) + n
        log.info(
            "Study %r holds %d trials: continuing it; new jobs in %s/resume%d_<job>",
            sweeper.study_name,
            n,
            config.hydra.sweep.dir,
            n,
        )
