"""Fixtures of the service tests: the tiny product-matching run of the tracking tests (one
epoch of DOLG on a test ResNet, 32 px synthetic postings), loaded through conf/serve.yaml
once per session; each test gets its own copy of the gallery and its own data_dir."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import replace

import pytest

from matching.service.app import build_app
from matching.service.gallery import Gallery
from matching.service.loading import Service, load_service
from matching.service.server import server_config
from tests.conftest import compose_config
from tests.tracking.conftest import matching_run, tiny_data  # noqa: F401


def serve_config(tmp_path, *overrides: str):
    """conf/serve.yaml as serve.py composes it, with every path under tmp_path. TestClient
    addresses the app as http://testserver: one of the service's names here."""
    overrides = ("allowed_hosts=[testserver]", *overrides)
    return compose_config("serve", list(overrides), tmp_path, data_dir=tmp_path / "data")


@pytest.fixture(scope="session")
def loaded(matching_run, tmp_path_factory) -> Service:  # noqa: F811
    """The service of the tiny run, as `python product-matching/serve.py run_dir=...` loads it."""
    root = tmp_path_factory.mktemp("serve_session")
    return load_service(serve_config(root, f"run_dir={matching_run.run_dir}"))


@pytest.fixture
def service(loaded, tmp_path) -> Service:
    """A fresh gallery (the run's postings) and data_dir for one test."""
    gallery = Gallery(loaded.gallery.dim, loaded.gallery.model_key, titles=loaded.gallery.titles)
    gallery.add(loaded.gallery.embeddings(), loaded.gallery.postings())
    settings = replace(loaded.settings, data_dir=tmp_path / "serve_data")
    return Service(loaded.embedder, gallery, settings)


@pytest.fixture
def client(service):
    from fastapi.testclient import TestClient

    with TestClient(build_app(service.embedder, service.gallery, service.settings)) as c:
        yield c


@contextmanager
def running(app, **limits):
    """The app on a real uvicorn server (serve.py's config, `limits` passed to it) in a
    thread, on a port the OS picks: its URL."""
    import uvicorn

    server = uvicorn.Server(server_config(app, "127.0.0.1", 0, "warning", **limits))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def live_server(service):
    """The service on a real uvicorn server in a thread: its URL."""
    with running(build_app(service.embedder, service.gallery, service.settings)) as url:
        yield url
