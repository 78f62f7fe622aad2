"""Smoke runs of the quality-at-a-fixed-budget benchmarks (bench/quality_*.py --quick).

Each runs ours (the pipeline's own `shared.train.run`) and the peer's loop for one epoch on
small data, in a subprocess as a user would, and checks what the JSON promises: the fields,
metrics in [0, 1], and the identity checks (same store, split, pixels, first batch, number of
steps, and the same untrained scores from the peer's own evaluation of the shared starting
weights). Ours' best evaluation must equal what `trainer.test` measured on the checkpoint
ModelCheckpoint kept: the benchmark's selection rule reproduces the pipeline's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.pipelines import env

CASES = {
    "quality_dino.py": ("lightly", ["knn_top1@10", "knn_top1@20", "knn_top1@100", "knn_top1@200"]),
    "quality_matching.py": ("pml", ["f1", "threshold", "precision", "recall", "recall@1", "map@r"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_quick_run_writes_comparable_results(tmp_path, script):
    peer, keys = CASES[script]
    out = tmp_path / "results" / "quality.json"
    cmd = [sys.executable, str(REPO / "bench" / script), "--quick", "--threads", "1",
           "--root", str(tmp_path / "data"), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert out.with_suffix(".png").stat().st_size > 0

    res = json.loads(out.read_text())
    assert res["args"]["quick"] is True and res["metrics"] == keys
    assert res["identity_ok"] is True
    for check in res["identity"]:
        same = {k: v for k, v in check.items() if k.startswith("same_")}
        assert len(same) >= 4 and all(same.values()), check

    for method in ("ours", peer):
        for part in ("final", "best"):
            for key in keys:
                stat = res["summary"][method][part][key]
                assert stat["n"] == 1 and stat["std"] == 0.0
                assert 0.0 <= stat["mean"] <= 1.0
        (run,) = res["per_seed"][method]
        assert [h["epoch"] for h in run["history"]] == [0, 1]
        for part in ("init", "final", "best"):
            assert all(0.0 <= run[part][k] <= 1.0 for k in keys), (method, part, run[part])
    for key in keys:
        assert res["summary"][f"ours_minus_{peer}"]["final"][key]["mean"] == pytest.approx(
            res["summary"]["ours"]["final"][key]["mean"]
            - res["summary"][peer]["final"][key]["mean"]
        )

    ours = res["per_seed"]["ours"][0]
    # ours' test figures: the held-out split, scored once with the validation-chosen checkpoint
    assert set(ours["test"]) == set(keys) and all(0.0 <= v <= 1.0 for v in ours["test"].values())
    assert res["per_seed"][peer][0]["init"] == pytest.approx(ours["init"], abs=1e-6)
