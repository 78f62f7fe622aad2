"""bench/scaling.py's core at toy sizes: IVF probing every cell must give flat's answers."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("scaling", REPO / "bench" / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["scaling"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("scaling", None)


def toy_case(part, index, nprobe=0):
    return {"part": part, "index": index, "n": 1500, "queries": 120, "dim": 32, "threads": 1,
            "reps": 1, "seed": 0, "nlist_factor": 1.0, "train_per_cell": 20,
            "nprobe": nprobe}  # fmt: skip


@pytest.mark.parametrize("part", ["knn", "sweep"])
def test_ivf_probing_every_cell_agrees_with_flat(scaling, part, tmp_path):
    flat = scaling.run_case(toy_case(part, "flat"))
    ivf = scaling.run_case(toy_case(part, "ivf", nprobe=10**6))  # capped at nlist
    assert ivf["options"]["nprobe"] == ivf["options"]["nlist"] == round(np.sqrt(1500))
    assert ivf["options"]["train_size"] == 20 * ivf["options"]["nlist"]  # a sample
    rows = [flat, ivf]
    scaling.compare(rows)
    if part == "knn":
        assert ivf["accuracy"] == flat["accuracy"]
        assert ivf["vs_flat"]["max_abs_top1_diff"] == 0.0
        assert 0.05 < flat["accuracy"]["20"] < 1.0  # well above chance (0.01), not trivial
    else:
        assert ivf["vs_flat"]["neighbour_recall"] == 1.0
        assert ivf["vs_flat"]["max_abs_f1_diff"] < 1e-12
        assert flat["sweep_s"] > 0 and flat["search_s"] > 0
    for r in rows:
        assert r["seconds"] > 0 and r["peak_mb"] > 0 and r["extra_mb"] >= 0
    png = scaling.plot(rows, tmp_path / "scaling.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
