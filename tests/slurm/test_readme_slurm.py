"""The README's SLURM commands as typed, on the local cluster, plus budget overrides only (the
docs' other commands run in tests/docs). The multi-node GPU request cannot run on a CPU
node: its resolved request is printed with `dry_run=true`, the documented way to see it."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.docs.readme import all_commands
from tests.docs.test_readme_runs import run, with_budget

pytestmark = pytest.mark.slurm

SLURM = [c for c in all_commands() if c.kind == "pipeline" and "hydra/launcher=slurm" in c.text]


@pytest.mark.parametrize("command", SLURM, ids=[f"{c.doc}:{c.line}" for c in SLURM])
def test_readme_slurm_command(tmp_path, command):
    argv = with_budget(command, list(command.argv))
    if "trainer=ddp " in command.text + " ":  # 8 GPUs x 2 nodes: show the request instead
        out = run(argv + ["dry_run=true"], tmp_path)
        assert "tasks_per_node: 8" in out.stdout and "nodes: 2" in out.stdout
        assert "gpus_per_node: 8" in out.stdout and "partition: gpu" in out.stdout
        return
    # the README's partition is the cluster's own; n_jobs as typed (trials at a time)
    run(argv, tmp_path, timeout=900)
    sweeps = list((tmp_path / "logs").glob("*/multiruns/*"))
    assert len(sweeps) == 1, sweeps
    records = [OmegaConf.load(p) for p in sweeps[0].glob("*/job_return.yaml")]
    jobs = 1
    for arg in command.overrides:
        if "," in arg and not arg.startswith("hydra."):
            jobs *= len(arg.split("=", 1)[1].split(","))
    if "hparams_search=" in command.text:
        jobs = 2  # hydra.sweeper.n_trials=2: the budget
    assert len(records) == jobs and all(r.status == "COMPLETED" for r in records)
