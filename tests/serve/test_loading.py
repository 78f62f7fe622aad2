"""conf/serve.yaml -> service: the default run, a CSV gallery, a saved index, ONNX, the CLI."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from matching.service.app import build_app
from matching.service.loading import load_service, newest_run
from shared.run_loading import load_run
from tests.conftest import REPO
from tests.serve.conftest import serve_config
from tests.serve.images import random_png


def synthetic_csv(matching_run) -> Path:
    (csv,) = (matching_run.data_dir / "synthetic_postings").glob("*/postings.csv")
    return csv


def csv_gallery(matching_run) -> list[str]:
    """The run's postings as a gallery CSV (their image paths are relative to images/)."""
    csv = synthetic_csv(matching_run)
    return [f"gallery={csv}", f"gallery_image_dir={csv.parent / 'images'}"]


def test_default_is_the_newest_run_with_a_checkpoint(matching_run, loaded, tmp_path):
    runs = tmp_path / "logs" / "product-matching" / "dolg" / "runs"
    shutil.copytree(matching_run.run_dir, runs / "2026-01-01_00-00-00")
    (runs / "2026-06-01_00-00-00" / ".hydra").mkdir(parents=True)  # started, no checkpoint
    assert newest_run(runs) == runs / "2026-01-01_00-00-00"
    service = load_service(serve_config(tmp_path))  # no run_dir: runs_root's newest
    assert len(service.gallery) == len(loaded.gallery)
    assert "2026-01-01_00-00-00" in service.embedder.name
    np.testing.assert_allclose(service.gallery.embeddings(), loaded.gallery.embeddings(), atol=1e-5)


def test_no_run_says_how_to_train_one(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_service(serve_config(tmp_path))
    message = str(info.value)
    assert "python product-matching/run.py" in message and "run_dir=" in message
    assert str(tmp_path / "logs") in message


def test_csv_gallery_and_saved_index(matching_run, loaded, tmp_path):
    overrides = [
        f"run_dir={matching_run.run_dir}",
        *csv_gallery(matching_run),
        "index_path=${data_dir}/g.npz",
    ]
    service = load_service(serve_config(tmp_path, *overrides))
    assert len(service.gallery) == len(loaded.gallery)
    data_dir = tmp_path / "data" / "serve"
    assert (data_dir / "g.npz").is_file() and (data_dir / "stores").is_dir()
    with TestClient(build_app(service.embedder, service.gallery, service.settings)) as c:
        r = c.post("/gallery", files=[("files", ("a.png", random_png(3), "image/png"))])
        assert r.status_code == 201
    again = load_service(serve_config(tmp_path, *overrides))  # the saved index, with the add
    assert len(again.gallery) == len(loaded.gallery) + 1
    assert again.gallery.get(r.json()["added"][0]) is not None
    # Everything the service wrote is under data_dir.
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert written and all(data_dir in p.parents for p in written)


def test_saved_index_of_other_weights_is_refused(matching_run, loaded, tmp_path):
    path = tmp_path / "g.npz"
    loaded.gallery.save(path)
    other = loaded.gallery.load(path, loaded.gallery.model_key)
    other.model_key = "some other checkpoint"
    other.save(path)
    with pytest.raises(ValueError, match="another model"):
        load_service(
            serve_config(tmp_path, f"run_dir={matching_run.run_dir}", f"index_path={path}")
        )


def mean_colour_onnx(path: Path, size: int) -> Path:
    """A stand-in with the export's interface (uint8 `images` [B, 3, size, size] ->
    `embeddings`) that embeds an image as its L2-normalised mean colour: built in
    milliseconds, and its output is easy to compute with numpy."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=0),
        helper.make_node("LpNormalization", ["mean"], ["embeddings"], axis=1, p=2),
    ]
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    inp = helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 3, size, size])
    out = helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph(nodes, "mean_colour", [inp], [out], initializer=[axes])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_onnx_backend_without_a_run(matching_run, loaded, tmp_path):
    """onnx=, gallery= and threshold= are enough; the service embeds with ONNX Runtime."""
    onnx = mean_colour_onnx(tmp_path / "model.onnx", 32)
    config = serve_config(tmp_path, f"onnx={onnx}", *csv_gallery(matching_run), "threshold=0.9")
    service = load_service(config)
    run = load_run(matching_run.run_dir)
    run.datamodule.setup()
    images = run.datamodule.store.images.numpy()
    mean = images.astype(np.float64).mean(axis=(2, 3))
    np.testing.assert_allclose(
        service.embedder.embed(images),
        mean / np.linalg.norm(mean, axis=1, keepdims=True),
        atol=1e-5,
    )
    assert service.settings.threshold == 0.9 and len(service.gallery) == len(images)
    with TestClient(build_app(service.embedder, service.gallery, service.settings)) as c:
        assert c.get("/health").json()["backend"] == "onnx"
        image = Path(service.gallery.postings()[4].image).read_bytes()
        top = c.post("/match", files=[("files", ("q.png", image, "image/png"))]).json()
        assert top["results"][0]["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_exported_model_gives_the_torch_neighbours(matching_run, loaded, tmp_path):
    """The run's real ONNX export (shared.export.onnx) serves what PyTorch serves."""
    from shared.export.onnx import export_onnx

    onnx = export_onnx(loaded.embedder.module, tmp_path / "model.onnx", loaded.embedder.image_size)
    config = serve_config(tmp_path, f"onnx={onnx}", f"run_dir={matching_run.run_dir}")
    service = load_service(config)
    assert service.settings.threshold == loaded.settings.threshold  # the run's, as with torch
    np.testing.assert_allclose(service.gallery.embeddings(), loaded.gallery.embeddings(), atol=1e-4)
    image = Path(loaded.gallery.postings()[4].image).read_bytes()
    results = []
    for s in (service, loaded):
        with TestClient(build_app(s.embedder, s.gallery, s.settings)) as c:
            body = c.post("/match", files=[("files", ("q.png", image, "image/png"))]).json()
            results.append([n["posting_id"] for n in body["results"][0]["neighbours"][:3]])
    assert results[0] == results[1]


def test_settings_are_checked_by_name(loaded):
    for key, value, message in (
        ("top_k", 500, "top_k=500 is above max_top_k=100"),
        ("max_files", 0, "max_files must be >= 1"),
        ("threshold", float("nan"), "threshold must be a finite number"),
        ("max_upload_mb", 0, "max_upload_mb must be > 0"),
    ):
        with pytest.raises(ValueError, match=message):
            replace(loaded.settings, **{key: value})


def test_onnx_of_another_image_size_is_refused(matching_run, tmp_path):
    path = mean_colour_onnx(tmp_path / "m48.onnx", 48)
    with pytest.raises(ValueError, match="takes 48 px images .* data.image_size=32"):
        load_service(serve_config(tmp_path, f"onnx={path}", f"run_dir={matching_run.run_dir}"))


@pytest.mark.slow
def test_the_command_line_serves(matching_run, tmp_path):
    """`python product-matching/serve.py run_dir=... port=0` as a user starts it (port 0: the
    OS picks one, read back from uvicorn's start-up line)."""
    cmd = [
        sys.executable,
        str(REPO / "product-matching/serve.py"),
        f"run_dir={matching_run.run_dir}",
        "port=0",
        f"paths.data_dir={tmp_path / 'data'}",
    ]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        lines = []
        for line in proc.stdout:  # ends if the process exits before serving
            lines.append(line)
            found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if found:
                break
        assert found, "".join(lines)[-3000:]
        url = f"http://127.0.0.1:{found.group(1)}"
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
        health = httpx.get(f"{url}/health", timeout=30).json()
        assert health["status"] == "ok" and health["gallery_size"] > 10
        image = sorted((synthetic_csv(matching_run).parent / "images").iterdir())[0]
        upload = [("files", (image.name, image.read_bytes(), "image/png"))]
        r = httpx.post(f"{url}/match", files=upload, timeout=30)
        assert r.json()["results"][0]["neighbours"][0]["posting_id"] == image.stem
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert list(cwd.iterdir()) == []  # no logs, no .hydra, no outputs
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # data_dir: only folders


def test_background_is_the_runs_unless_set_and_a_conflict_is_refused(loaded):
    """null takes the run's data.background (white for runs older than the key); a value
    that differs from the run's is refused while the run's postings are the gallery."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from matching.service.loading import service_background
    from shared.data.sources import DEFAULT_BACKGROUND

    assert loaded.settings.background == DEFAULT_BACKGROUND  # conf/serve.yaml + the tiny run

    def cfg(**kw):
        return OmegaConf.create({"background": None, "gallery": None, **kw})

    run = SimpleNamespace(config=OmegaConf.create({"data": {"background": [10, 20, 30]}}))
    run.run_dir = "runs/x"
    old = SimpleNamespace(config=OmegaConf.create({"data": {}}), run_dir="runs/old")
    assert service_background(cfg(), run) == (10, 20, 30)
    assert service_background(cfg(), old) == service_background(cfg(), None) == DEFAULT_BACKGROUND
    with pytest.raises(ValueError, match=r"background=\[0, 0, 0\] differs from data.background"):
        service_background(cfg(background=[0, 0, 0]), run)
    assert service_background(cfg(background=[0, 0, 0], gallery="g.csv"), run) == (0, 0, 0)
    with pytest.raises(ValueError, match=r"background=\[1, 2\] is not a colour"):
        service_background(cfg(background=[1, 2]), None)
    with pytest.raises(ValueError, match="background=.* is not a colour"):
        replace(loaded.settings, background=(0, 0, 300))
