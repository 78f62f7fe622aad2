"""Smoke run of bench/chain_study.py --quick: DINO on the postings, then matching from random
init, from the DINO teacher and with titles, and the linear probe, all through the real
command lines on tiny data. The JSON must hold every figure, and (c)'s combined, image-only and
title-only F1 must be the ones the matching evaluation logged at test time (the run's own
metrics.csv, written by the CSV logger, not by results.json)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.pipelines import env

MATCH = ["f1", "precision", "recall", "threshold", "recall@1", "map@r"]
PROBE = ["knn_top1@10", "knn_top1@20", "knn_top1@100", "knn_top1@200", "linear_top1"]
STAGES = ["dino", "random", "from_dino", "titles", "probe", "probe_init"]


def logged_test_row(run_dir) -> dict[str, float]:
    """The last metrics.csv row with test figures: the best checkpoint's test."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("test/f1")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("test/") and v}


@pytest.mark.slow
def test_quick_chain_records_every_figure(tmp_path):
    out, work = tmp_path / "chain.json", tmp_path / "runs"
    cmd = [sys.executable, str(REPO / "bench" / "chain_study.py"), "--quick", "--threads", "1",
           "--root", str(tmp_path / "data"), "--work", str(work), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    (seed,) = res["per_seed"]
    summary = res["summary"]

    for method in ("random", "from_dino"):
        for part in ("test", "untrained"):
            assert set(seed[method][part]) == set(MATCH)
            assert all(0.0 <= v <= 1.0 for v in seed[method][part].values()), seed[method]
        # the figures are the run's test at the validation-chosen checkpoint and threshold
        logged = logged_test_row(Path(seed[method]["run_dir"]))
        assert seed[method]["test"] == pytest.approx({k: logged[f"test/{k}"] for k in MATCH})
        assert seed[method]["test"]["threshold"] == pytest.approx(
            seed[method]["chosen"]["threshold"], abs=1e-6
        )
    titles = seed["titles"]["test"]
    logged = logged_test_row(Path(seed["titles"]["run_dir"]))
    for key in ("f1", "f1_image", "f1_text", "recall@1", "map@r"):
        assert titles[key] == pytest.approx(logged[f"test/{key}"], abs=1e-7), key
    assert seed["titles"]["chosen"]["text"]["mode"] == "sum"

    for which in ("trained", "init"):
        probe = seed["probe"][which]
        assert set(PROBE) <= set(probe) and all(0.0 <= probe[k] <= 1.0 for k in PROBE)
    assert seed["probe"]["init"]["linear_top1"] == pytest.approx(
        json.loads((Path(seed["probe"]["run_dir"]) / "linear_probe_init.json").read_text())[
            "test_top1"
        ]
    )
    for stage in STAGES:
        t = seed["timing"][stage]
        assert t["wall_s"] > 0 and t["cpu_s"] > 0, (stage, t)
    assert summary["chain_cpu_s"]["mean"] == pytest.approx(
        seed["timing"]["dino"]["cpu_s"] + seed["timing"]["from_dino"]["cpu_s"]
    )
    for key in MATCH:
        assert summary["from_dino_minus_random"][key]["mean"] == pytest.approx(
            seed["from_dino"]["test"][key] - seed["random"]["test"][key]
        )
    assert summary["titles_minus_from_dino"]["f1"]["mean"] == pytest.approx(
        titles["f1"] - seed["from_dino"]["test"]["f1"]
    )
