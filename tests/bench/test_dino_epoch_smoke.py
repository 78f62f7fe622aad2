"""Smoke run of bench/dino_epoch.py --quick: ours and lightly's DINO epochs, and the
before / now part pointed at this very checkout.

Checks what the JSON promises against the data module built independently here: every epoch
on both sides trains len(train rows) // batch steps of a full batch (drop_last), img/s is
images / epoch s, the ratio column is ours / lightly of the same pair, and the worker for
another checkout imports that checkout's code.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, compose_config
from tests.pipelines import env


def expected_steps(tmp_path, root, families: int) -> tuple[int, int]:
    from shared.instantiate import instantiate

    cfg = compose_config("ssl", [f"data.source.num_families={families}"], tmp_path / "cfg", root)
    dm = instantiate(cfg.data, "data")
    dm.setup()
    return len(dm.train_indices) // cfg.data.batch_size, cfg.data.batch_size


@pytest.mark.slow
def test_quick_run_times_both_sides_on_the_same_epoch(tmp_path):
    root, out = tmp_path / "data", tmp_path / "results" / "dino_epoch.json"
    cmd = [sys.executable, str(REPO / "bench" / "dino_epoch.py"), "--quick", "--threads", "1",
           "--root", str(root), "--out", str(out), "--before", str(REPO)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["args"]["quick"] is True and res["args"]["families"] == 8

    steps, batch = expected_steps(tmp_path, root, families=8)
    assert steps >= 1
    assert [r["workers"] for r in res["peer"]] == [0, 2]
    for row in res["peer"]:
        (pair,) = row["pairs"]
        for side in ("ours", "lightly"):
            run = pair[side]
            assert run["steps"] == steps and run["images"] == steps * batch, (side, run)
            assert 0 < run["steps_s"] <= run["epoch_s"]
            assert run["img_s"] == pytest.approx(run["images"] / run["epoch_s"])
        ratio = pair["ours"]["img_s"] / pair["lightly"]["img_s"]
        assert row["ours_over_lightly"]["median"] == pytest.approx(ratio)

    part = res["before_now"]
    (pair,) = part["pairs"]
    # the "before" worker ran this checkout's code from its own subprocess, on its own store
    for side in ("before", "now"):
        (epoch,) = pair[side]
        assert epoch["steps"] == steps and epoch["images"] == steps * batch
    (summary,) = part["per_epoch"]
    ratio = pair["now"][0]["epoch_s"] / pair["before"][0]["epoch_s"]
    assert summary["now_over_before"]["median"] == pytest.approx(ratio)
