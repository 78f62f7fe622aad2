"""conf/serve.yaml -> service: the default run, a CSV gallery, the stored gallery, ONNX, the CLI."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
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


def add(service, *uploads, **data):
    """POST /gallery through the app of `service`: the response."""
    with TestClient(build_app(service.embedder, service.gallery, service.settings)) as c:
        return c.post(
            "/gallery",
            files=[("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(uploads)],
            data=data,
        )


def test_restart_shows_exactly_the_acknowledged_postings(matching_run, loaded, tmp_path):
    """Additions that got a 201 are there after a restart, with their embeddings and image
    files; refused ones are not, and leave no file behind. The CSV is embedded only once."""
    config = serve_config(tmp_path, f"run_dir={matching_run.run_dir}", *csv_gallery(matching_run))
    service = load_service(config)
    assert len(service.gallery) == len(loaded.gallery)
    acked = [add(service, random_png(1), random_png(2), posting_id=["a1", "a2"])]
    acked.append(add(service, random_png(3)))  # a generated id
    assert [r.status_code for r in acked] == [201, 201]
    refused = [
        add(service, random_png(4), posting_id="a1"),  # taken: 409
        add(service, random_png(5), b"not an image", posting_id=["b1", "b2"]),  # 400
    ]
    assert [r.status_code for r in refused] == [409, 400]
    before = dict(
        zip((p.posting_id for p in service.gallery.postings()), service.gallery.embeddings())
    )
    service.gallery.close()

    again = load_service(config)
    ids = [pid for r in acked for pid in r.json()["added"]]
    seed = [p.posting_id for p in loaded.gallery.postings()]
    assert [p.posting_id for p in again.gallery.postings()] == seed + ids
    np.testing.assert_array_equal(again.gallery.embeddings(), np.stack(list(before.values())))
    images = sorted((tmp_path / "data" / "serve" / "gallery_images").iterdir())
    assert sorted(Path(again.gallery.get(pid).image) for pid in ids) == images
    assert Path(again.gallery.get("a2").image).read_bytes() == random_png(2)
    again.gallery.close()


def test_the_gallery_csv_is_embedded_once_and_again_when_it_changes(matching_run, tmp_path, caplog):
    csv = synthetic_csv(matching_run)
    config = serve_config(tmp_path, f"run_dir={matching_run.run_dir}", *csv_gallery(matching_run))
    service = load_service(config)
    assert add(service, random_png(6), posting_id="kept").status_code == 201
    service.gallery.close()
    caplog.set_level("INFO")
    caplog.clear()
    service = load_service(config)
    assert not [r for r in caplog.records if r.getMessage().startswith("Embedding")]
    service.gallery.close()

    shorter = tmp_path / "postings.csv"  # the CSV loses its first 5 rows
    lines = csv.read_text().splitlines(keepends=True)
    shorter.write_text("".join(lines[:1] + lines[6:]))
    config.gallery = str(shorter)
    caplog.clear()
    service = load_service(config)
    assert [r for r in caplog.records if r.getMessage().startswith("Embedding")]
    ids = [p.posting_id for p in service.gallery.postings()]
    assert len(ids) == len(lines) - 6 + 1 and "kept" in ids
    service.gallery.close()


def test_gallery_of_other_weights_is_refused_or_reembedded(matching_run, loaded, tmp_path):
    """The gallery is tied to the weights' content: a `touch` or a copy of the checkpoint
    changes nothing; other weights are refused with what to do, and `reembed=true` embeds
    every posting again from its image file."""
    config = serve_config(tmp_path, f"run_dir={matching_run.run_dir}")
    service = load_service(config)
    assert add(service, random_png(7), posting_id="mine").status_code == 201
    expected = service.gallery.embeddings()
    service.gallery.close()
    checkpoint = load_run(matching_run.run_dir).checkpoint
    os.utime(checkpoint)
    copy = tmp_path / "copied_run"
    shutil.copytree(matching_run.run_dir, copy)
    again = load_service(serve_config(tmp_path, f"run_dir={copy}"))  # same weights, new file
    assert len(again.gallery) == len(expected)
    again.gallery.close()

    db = tmp_path / "data" / "serve" / "gallery.sqlite"
    with sqlite3.connect(db) as con:  # as if another model had built it
        con.execute("UPDATE meta SET value = 'sha256:other' WHERE key = 'model_key'")
        con.execute("UPDATE postings SET embedding = zeroblob(length(embedding))")
    with pytest.raises(ValueError) as info:
        load_service(config)
    message = str(info.value)
    assert str(db) in message and "1 posting(s) added" in message and "reembed=true" in message
    with sqlite3.connect(db) as con:  # refused: untouched
        assert (
            con.execute("SELECT value FROM meta WHERE key='model_key'").fetchone()[0]
            == "sha256:other"
        )

    config.reembed = True
    fixed = load_service(config)
    np.testing.assert_allclose(fixed.gallery.embeddings(), expected, atol=1e-5)
    fixed.gallery.close()


def test_orphan_images_are_removed_at_start_up(matching_run, tmp_path):
    """Image files no posting refers to (a crash between writing them and the commit) are
    deleted when the service starts; those of postings stay."""
    config = serve_config(tmp_path, f"run_dir={matching_run.run_dir}")
    service = load_service(config)
    assert add(service, random_png(8), posting_id="p-ok").status_code == 201
    service.gallery.close()
    images = tmp_path / "data" / "serve" / "gallery_images"
    (images / "0123456789abcdef0123456789abcdef.png").write_bytes(random_png(9))
    service = load_service(config)
    assert list(images.iterdir()) == [Path(service.gallery.get("p-ok").image)]
    service.gallery.close()


def test_gallery_db_null_keeps_nothing(matching_run, loaded, tmp_path):
    service = load_service(
        serve_config(tmp_path, f"run_dir={matching_run.run_dir}", "gallery_db=null")
    )
    assert service.gallery.store is None and len(service.gallery) == len(loaded.gallery)
    assert not list(tmp_path.rglob("*.sqlite"))


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
    files = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    db = "data/serve/gallery.sqlite"
    assert files == {db, f"{db}.lock"}  # closed on exit: no write-ahead log left


def test_background_is_the_runs_unless_set_and_a_conflict_is_refused(loaded):
    """null takes the run's data.source.background (white for runs older than the key); a value
    that differs from the run's is refused while the run's postings are the gallery."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from matching.service.loading import service_background
    from shared.data.sources import DEFAULT_BACKGROUND

    assert loaded.settings.background == DEFAULT_BACKGROUND  # conf/serve.yaml + the tiny run

    def cfg(**kw):
        return OmegaConf.create({"background": None, "gallery": None, **kw})

    own = {"data": {"source": {"background": [10, 20, 30]}}}
    run = SimpleNamespace(config=OmegaConf.create(own))
    run.run_dir = "runs/x"
    old = SimpleNamespace(config=OmegaConf.create({"data": {}}), run_dir="runs/old")
    assert service_background(cfg(), run) == (10, 20, 30)
    assert service_background(cfg(), old) == service_background(cfg(), None) == DEFAULT_BACKGROUND
    with pytest.raises(
        ValueError, match=r"background=\[0, 0, 0\] differs from data.source.background"
    ):
        service_background(cfg(background=[0, 0, 0]), run)
    assert service_background(cfg(background=[0, 0, 0], gallery="g.csv"), run) == (0, 0, 0)
    with pytest.raises(ValueError, match=r"background=\[1, 2\] is not a colour"):
        service_background(cfg(background=[1, 2]), None)
    with pytest.raises(ValueError, match="background=.* is not a colour"):
        replace(loaded.settings, background=(0, 0, 300))
