"""The docs as tests: every command in README.md and bench/README.md is known, composes as
typed, and (slow stage) the ones a CPU can run do run, as typed, plus budget overrides only.

Fast checks (default suite): each command has a kind; each pipeline command composes into
every job it would start, with `hydra.run.dir` / `hydra.sweep.dir` resolved as Hydra resolves
them (the sweep folder before any job exists); each inline `key=value` in the prose composes;
each tool's flags exist. The runs themselves are in `test_readme_runs.py`.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from shared.launch import planned_jobs
from tests.conftest import CONF, REPO
from tests.docs.readme import DOCS, all_commands, script_flags, substitute

COMMANDS = all_commands()
CONFIG = {"ssl": "ssl", "matching": "matching"}
PLACEHOLDERS = {"<time>": "2026-01-01_00-00-00", "<that dir>": "/tmp/sweep", "<group>": "ssl"}


def ids(commands):
    return [f"{c.doc}:{c.line}:{c.text[:60]}" for c in commands]


def test_the_docs_hold_the_commands_we_test():
    """Guards the reader: a broken parser would silently test nothing."""
    kinds = {c.kind for c in COMMANDS}
    assert {"pipeline", "infer", "serve", "export", "lr_find", "bench"} <= kinds
    assert sum(c.kind == "pipeline" for c in COMMANDS) >= 30


@pytest.mark.parametrize("command", COMMANDS, ids=ids(COMMANDS))
def test_every_command_is_known(command):
    assert command.kind != "unknown", f"{command}: add it to tests/docs/readme.py or fix it"


def compose_jobs(config_name: str, overrides: list[str], multirun: bool):
    """Every job config `run.py [-m] overrides` would start, each resolved as Hydra does."""
    gh = GlobalHydra.instance()
    if not multirun:
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        str(cfg.hydra.run.dir)  # the run folder
        return [cfg]
    sweep = gh.hydra.compose_config(
        config_name, overrides, run_mode=RunMode.MULTIRUN, with_log_configuration=False
    )
    HydraConfig.instance().cfg = None  # as in Hydra's sweeper: no job config is set yet
    str(sweep.hydra.sweep.dir)  # the sweep folder, made before any job is composed
    jobs = [job for _, job in planned_jobs(sweep)]
    for num, job in enumerate(jobs):
        with open_dict(job):  # what the launcher sets before it resolves the job's folder
            job.hydra.job.num, job.hydra.job.id = num, f"job_{num}"
        HydraConfig.instance().set_config(job)
        str(job.hydra.sweep.subdir)
    return jobs


def resolve_job(cfg) -> None:
    """The job config as run() gets it (Hydra's own node removed), fully resolved."""
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.resolve(job)


@pytest.fixture
def hydra_conf():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None


PIPELINE_COMMANDS = [c for c in COMMANDS if c.kind == "pipeline"]


@pytest.mark.parametrize("command", PIPELINE_COMMANDS, ids=ids(PIPELINE_COMMANDS))
def test_pipeline_command_composes_every_job(hydra_conf, command):
    overrides = substitute(command.overrides, PLACEHOLDERS)
    for job in compose_jobs(CONFIG[command.pipeline], overrides, command.multirun):
        resolve_job(job)


def inline_overrides() -> list[tuple[str, str]]:
    """(doc, text) of each `key=value` in the prose that names a config key or group."""
    found = []
    keys = {
        k for name in ("base", "ssl", "matching") for k in OmegaConf.load(CONF / f"{name}.yaml")
    }
    keys |= {p.name for p in CONF.iterdir()}
    for doc in DOCS:
        for span in re.findall(r"`([^`\s]+=[^`\s]+)`", (REPO / doc).read_text()):
            key = span.split("=", 1)[0].lstrip("+~")
            if re.fullmatch(r"[a-z_][\w./]*", key) and ("." in key or "/" in key or key in keys):
                found.append((doc, span))
    return sorted(set(found))


INLINE = inline_overrides()
# Where an inline key=value may apply: either pipeline as it comes, or with a file source
# (`data.source.skip_corrupt` belongs to the folder and CSV sources).
CONTEXTS = [
    ("ssl", []),
    ("matching", []),
    ("ssl", ["data/source=folder", "data.source.root=/data/imgs"]),
    ("ssl", ["data/source=csv", "data.source.csv_path=/data/a.csv"]),
]


@pytest.mark.parametrize("doc, span", INLINE, ids=[s for _, s in INLINE])
def test_inline_override_composes(hydra_conf, doc, span):
    """A key=value the prose suggests composes with a pipeline (`a|b` means each of them)."""
    key, values = span.split("=", 1)
    errors = []
    for value in values.split("|"):
        override = substitute([f"{key}={value}"], PLACEHOLDERS)
        for config_name, extra in CONTEXTS:
            if key.startswith("hydra.launcher."):
                extra = [*extra, "hydra/launcher=slurm"]
            try:
                multirun = "," in value and not value.startswith("[")
                for job in compose_jobs(config_name, extra + override, multirun):
                    resolve_job(job)
                break
            except Exception as exc:  # noqa: BLE001  (collected: one pipeline must accept it)
                errors.append(f"{config_name}: {type(exc).__name__}: {exc}")
        else:
            pytest.fail(
                f"{doc}: `{key}={value}` composes with neither pipeline:\n" + "\n".join(errors)
            )


TOOL_SCRIPTS = {
    "infer": "product-matching/infer.py",
    "export": "shared/export/onnx.py",
    "lr_find": "shared/tracking/lr_find.py",
    "linear_probe": "shared/linear_probe.py",
}
TOOLS = [c for c in COMMANDS if c.kind in (*TOOL_SCRIPTS, "bench")]


@pytest.mark.parametrize("command", TOOLS, ids=ids(TOOLS))
def test_tool_flags_exist(command):
    script = REPO / (TOOL_SCRIPTS.get(command.kind) or command.argv[1])
    assert script.is_file(), command
    flags = {a.split("=", 1)[0] for a in command.argv if a.startswith("--")}
    unknown = flags - script_flags(script)
    assert not unknown, f"{command}: {script.name} has no {sorted(unknown)}"


SERVE = [c for c in COMMANDS if c.kind == "serve"]


@pytest.mark.parametrize("command", SERVE, ids=ids(SERVE))
def test_serve_command_composes(hydra_conf, command):
    overrides = substitute(command.argv[2:], PLACEHOLDERS)
    cfg = compose(config_name="serve", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    resolve_job(cfg)


@pytest.mark.parametrize(
    "script, example", [("ssl/run.py", "module=dolg"), ("product-matching/run.py", "data.fold=2")]
)
def test_help_shows_usage_and_examples(script, example):
    out = subprocess.run(
        [sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"Usage: python {script}" in out.stdout and example in out.stdout
    assert (
        "dry_run=true" in out.stdout
        and "data/source: csv, folder, postings, synthetic" in out.stdout
    )
    assert "\nseed: 0" not in out.stdout  # not the whole config (that is --cfg job)
