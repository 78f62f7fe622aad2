"""Both pipelines through their real command line, in subprocesses, on tiny data.

Shared by the sweep, SLURM and DDP tests: each pipeline's tiny overrides, and `cli()` that
runs `python <pipeline>/run.py ...` as a user types it, with only budget overrides and the
log / data folders under the test's tmp_path; `run_dir()` and `sweep_dir()` find where the
command wrote, as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, TINY_SYNTHETIC

SCRIPTS = {"ssl": "ssl/run.py", "matching": "product-matching/run.py"}
LOG_NAMES = {"ssl": "ssl", "matching": "product-matching"}  # the config's `pipeline`


def _replace(base: list[str], *extra: str) -> list[str]:
    """`base` with the keys of `extra` replaced (Hydra refuses a key given twice)."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [b for b in base if b.split("=", 1)[0] not in keys] + list(extra)


# Small enough for seconds per epoch on one CPU core. SSL: at least 2 validation images per
# class (Recall@K needs a second item of the label) and a kNN bank of >= 20 (val/knn_top1@20).
TINY_SSL_DATA = _replace(
    TINY_SYNTHETIC,
    "data.source.min_instances=4",
    "data.source.max_instances=6",
    "data.val_fraction=0.5",
    "backbone.name=test_resnet",
)
TINY = {
    "ssl": [
        *TINY_SSL_DATA,
        "module.out_dim=256",
        "module.hidden_dim=128",
        "module.bottleneck_dim=64",
        "module.multicrop.global_size=32",
        "module.multicrop.local_size=16",
        "module.multicrop.n_local=2",
    ],
    "matching": [
        "data.source.synthetic.num_families=6",
        "data.source.synthetic.groups_per_family=2",
        "data.source.synthetic.min_instances=3",
        "data.source.synthetic.max_instances=5",
        "data.source.synthetic.image_size=32",
        "data.image_size=32",
        "data.batch_size=8",
        "data.eval_batch_size=16",
        "backbone.name=test_resnet",
        "module.model.local_dim=32",
        "module.model.global_dim=32",
        "module.model.embedding_dim=32",
    ],
}

# A few batches per epoch, validated (and checkpointed) every epoch. No progress-bar switch:
# output to a pipe gets plain log lines by itself, as a user's nohup or SLURM log does.
SHORT = [
    "trainer.max_epochs=2",
    "+trainer.limit_train_batches=2",
    "trainer.check_val_every_n_epoch=1",
]


def cli(
    pipeline: str,
    tmp_path: Path,
    *overrides: str,
    multirun: bool = False,
    data_dir: Path | None = None,
) -> list[str]:
    """The command line of one run or sweep, writing under `tmp_path / "logs"`;
    `overrides` replace the tiny defaults of the same key."""
    base = [
        *TINY[pipeline],
        *SHORT,
        f"paths.data_dir={data_dir or tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    return [
        sys.executable,
        str(REPO / SCRIPTS[pipeline]),
        *(["-m"] if multirun else []),
        *_replace(base, *overrides),
    ]


def _only(paths: list[Path], what: str) -> Path:
    if len(paths) != 1:
        raise AssertionError(f"expected one {what}, found {[str(p) for p in paths]}")
    return paths[0]


def run_dir(pipeline: str, tmp_path: Path, task: str = "*") -> Path:
    """The one run directory `logs/<pipeline>/<task>/runs/<time>/` under tmp_path."""
    found = sorted((tmp_path / "logs" / LOG_NAMES[pipeline]).glob(f"{task}/runs/*"))
    return _only(found, "run directory")


def sweep_dir(pipeline: str, tmp_path: Path) -> Path:
    """The one sweep directory `logs/<pipeline>/multiruns/<time>/` under tmp_path."""
    found = sorted((tmp_path / "logs" / LOG_NAMES[pipeline] / "multiruns").glob("*"))
    return _only(found, "sweep directory")


def env() -> dict[str, str]:
    """One thread per process: the tests share two cores, and runs stay reproducible."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
