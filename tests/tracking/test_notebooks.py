"""Both inspection notebooks run end to end on tiny runs made as a user makes them."""

from __future__ import annotations

import nbformat
import pytest

from tests.conftest import REPO
from tests.tracking.runs import TINY_DINO, TINY_MATCHING, run_script

NOTEBOOKS = REPO / "notebooks"


@pytest.mark.parametrize("name", ["ssl_inspection", "matching_inspection"])
def test_notebooks_are_stored_without_outputs(name):
    book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(book)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and 'os.environ.get("RUN_DIR"' in params[0].source


def execute(name: str, run_dir, monkeypatch, tmp_path):
    from nbclient import NotebookClient

    monkeypatch.setenv("RUN_DIR", str(run_dir))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline figures
    book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(
        book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = "".join(o.get("text", "") for c in book.cells for o in c.get("outputs", []))
    images = sum("image/png" in o.get("data", {}) for c in book.cells for o in c.get("outputs", []))
    return text, images


@pytest.mark.slow
def test_ssl_notebook_runs_on_a_vit_run(tmp_path, tiny_data, monkeypatch):
    run = run_script("ssl/run.py", TINY_DINO, tmp_path / "run", tiny_data)
    text, images = execute("ssl_inspection", run, monkeypatch, tmp_path)
    assert f"run        {run}" in text
    assert "heads on a" in text  # the attention cell ran (test_vit is a ViT)
    assert images == 4  # kNN curve, gallery, attention maps, 2-D projection


@pytest.mark.slow
def test_matching_notebook_runs(tmp_path, tiny_data, monkeypatch):
    run = run_script("product-matching/run.py", TINY_MATCHING, tmp_path / "run", tiny_data)
    text, images = execute("matching_inspection", run, monkeypatch, tmp_path)
    assert "mean F1" in text
    assert images >= 3  # threshold sweep, at least one worst group, matches gallery
