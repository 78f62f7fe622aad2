"""Fault injection on the stored gallery: a full disk during an addition, and `kill -9` of
the service while clients add postings. Each must end with every acknowledged posting kept
(with its image), nothing unacknowledged half-kept, and no orphan files."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from matching.service.app import IMAGES_SUBDIR, build_app
from matching.service.gallery import Gallery, GalleryStore
from matching.service.images import decode_upload
from matching.service.loading import load_service
from tests.conftest import REPO
from tests.serve.conftest import serve_config
from tests.serve.images import random_png

DB_FILES = {"gallery.sqlite", "gallery.sqlite-wal", "gallery.sqlite-shm", "gallery.sqlite.lock"}


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs, a disk that is easy to fill."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Take all but `leave` bytes of the disk with one file."""
    ballast = disk / "ballast"
    ballast.unlink(missing_ok=True)
    st = os.statvfs(disk)
    size = st.f_bavail * st.f_frsize - leave
    with open(ballast, "wb") as fh:
        if size > 0:
            os.posix_fallocate(fh.fileno(), 0, size)
    return ballast


def files_on(disk: Path) -> set[str]:
    return {str(p.relative_to(disk)) for p in disk.rglob("*") if p.is_file()}


def test_full_disk_refuses_the_addition_and_keeps_nothing(loaded, tiny_disk):
    """One addition at each amount of free space from none to enough: each one gets a 201
    or a 507, fails either writing its image or committing, and a failed one leaves no row,
    no file, no id taken and no space held; it succeeds when sent again after space is
    freed, and a restart shows exactly the postings that got a 201."""
    store = GalleryStore(tiny_disk / "gallery.sqlite")
    gallery = Gallery(loaded.gallery.dim, loaded.gallery.model_key, store)
    seed = loaded.gallery.postings()
    gallery.add(loaded.gallery.embeddings(), seed)
    settings = replace(loaded.settings, data_dir=tiny_disk)
    image = random_png(11, size=48)
    acked, refused, reasons = [], [], set()
    with TestClient(build_app(loaded.embedder, gallery, settings)) as c:
        for leave in range(0, 48 * 1024, 4096):
            pid = f"free-{leave}"
            expected_files = files_on(tiny_disk) | {"ballast"}
            fill(tiny_disk, leave)
            used = {
                f: (tiny_disk / f).stat().st_blocks for f in DB_FILES if (tiny_disk / f).exists()
            }
            r = c.post(
                "/gallery",
                files=[("files", ("a.png", image, "image/png"))],
                data={"posting_id": pid},
            )
            if r.status_code == 201:
                acked.append(pid)
                continue
            assert r.status_code == 507, r.text
            assert "disk is full" in r.json()["detail"]
            reasons.add("commit" if "gallery_db" in r.json()["detail"] else "image")
            refused.append(pid)
            assert pid not in gallery and len(gallery) == len(seed) + len(acked)
            assert store.count() == len(seed) + len(acked)
            assert files_on(tiny_disk) <= expected_files  # no orphan image, no temp file
            # Space held afterwards: at most the failed transaction's log frames, which the
            # next transaction overwrites (the old save left a whole partial index behind).
            grown = sum(
                (tiny_disk / name).stat().st_blocks - blocks for name, blocks in used.items()
            )
            assert grown * 512 <= 4 * 4096, grown
        assert reasons == {"image", "commit"}  # both stages met the full disk
        assert acked, "free space never sufficed: the sweep is too short"
        (tiny_disk / "ballast").unlink()
        for pid in refused:  # the ids are free again
            r = c.post(
                "/gallery",
                files=[("files", ("a.png", image, "image/png"))],
                data={"posting_id": pid},
            )
            assert r.status_code == 201, r.text
    gallery.close()
    back = Gallery.from_store(GalleryStore(tiny_disk / "gallery.sqlite"), gallery.dim, "k")
    added = [p for p in back.postings()[len(seed) :]]
    assert [p.posting_id for p in added] == acked + refused
    images = {f"{IMAGES_SUBDIR}/{Path(p.image).name}" for p in added}
    assert files_on(tiny_disk) - DB_FILES == images
    assert all(Path(p.image).read_bytes() == image for p in added)
    back.close()


@pytest.mark.slow
def test_kill_9_during_additions_loses_nothing_acknowledged(matching_run, tmp_path):
    """The service (serve.py in a subprocess) is killed with SIGKILL while four clients add
    postings; started again, it holds every posting that got a 201, with its own image and
    embedding, no posting that was not sent, and no image file without a posting."""
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "product-matching/serve.py"),
            f"run_dir={matching_run.run_dir}",
            "port=0",
            f"paths.data_dir={tmp_path / 'data'}",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if found := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line):
            break
    assert found, "".join(lines)[-3000:]
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    url = f"http://127.0.0.1:{found.group(1)}"
    sent, acked, lock, stop = {}, set(), threading.Lock(), threading.Event()

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            for n in range(10_000):
                pid, blob = f"c{k}-{n}", random_png(1000 * k + n, size=32)
                with lock:
                    sent[pid] = blob
                try:
                    r = c.post(
                        "/gallery",
                        files=[("files", ("a.png", blob, "image/png"))],
                        data={"posting_id": pid},
                    )
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code == 201:
                    with lock:
                        acked.add(pid)
                if stop.is_set():
                    return

    clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in clients:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    stop.set()
    for t in clients:
        t.join(timeout=60)
    assert len(acked) >= 40

    service = load_service(serve_config(tmp_path, f"run_dir={matching_run.run_dir}"))
    gallery = service.gallery
    added = [p for p in gallery.postings() if p.posting_id in sent]
    ids = {p.posting_id for p in added}
    assert acked <= ids  # nothing acknowledged lost; at most the in-flight ones beside them
    assert len(ids) - len(acked) <= len(clients)
    images = service.settings.data_dir / IMAGES_SUBDIR
    assert sorted(images.iterdir()) == sorted(Path(p.image) for p in added)  # no orphans
    for p in added:
        assert Path(p.image).read_bytes() == sent[p.posting_id]
    # Each stored embedding is the one of its own image (no row paired with another's vector).
    pixels = np.stack([decode_upload(sent[p.posting_id], "q", 32, 10**6)[0] for p in added])
    reference = service.embedder.embed(pixels)
    rows = {p.posting_id: i for i, p in enumerate(gallery.postings())}
    stored = gallery.embeddings()[[rows[p.posting_id] for p in added]]
    np.testing.assert_allclose(
        stored, reference / np.linalg.norm(reference, axis=1, keepdims=True), atol=1e-5
    )
    gallery.close()
