"""The SSL pipeline through its real command line, in subprocesses."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_SYNTHETIC


def cli(script: str, tmp_path: Path, *overrides: str, run_dir: Path | None = None):
    run_dir = run_dir or tmp_path / "run"
    cmd = [
        sys.executable,
        str(REPO / script),
        *TINY_SYNTHETIC,
        f"hydra.run.dir={run_dir}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        *overrides,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return cmd, env, run_dir


@pytest.mark.parametrize("module", ["dino", "dolg", "cgd"])
def test_fast_dev_run(tmp_path, module):
    """`module=` is all it takes to switch DINO for supervised DOLG or CGD."""
    cmd, env, run_dir = cli("ssl/run.py", tmp_path, "debug=fdr", f"module={module}")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test/knn_top1@20" in out.stdout
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "config_resolved.yaml").is_file()


@pytest.mark.slow
def test_kill_and_restart_resumes_from_last_ckpt(tmp_path):
    overrides = (
        "trainer.max_epochs=4",
        "trainer.check_val_every_n_epoch=1",
        "eval_at_init=false",
        "test=false",
        "logger=csv",
    )
    cmd, env, run_dir = cli("ssl/run.py", tmp_path, *overrides)
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 400
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert last.exists(), "no last.ckpt before the deadline"
    time.sleep(1.0)  # let the first save finish (saves are atomic: rename into place)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, map_location="cpu", weights_only=True)
    assert killed_at["epoch"] < 3

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Resuming from {last}" in out.stdout + out.stderr
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["epoch"] == 3
    steps_per_epoch = killed_at["global_step"] // (killed_at["epoch"] + 1)
    assert final["global_step"] == 4 * steps_per_epoch
