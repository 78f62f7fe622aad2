"""Overload and exposure: micro-batching, bounded decoding (503), body and header deadlines
(408 / close), rate-limited logs, the API token and what /health reveals."""

from __future__ import annotations

import inspect
import logging
import socket
import subprocess
import sys
import threading
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import matching.service.app as app_mod
from matching.service.app import Settings, build_app
from matching.service.batching import Busy, MicroBatcher
from matching.service.embedder import Embedder
from matching.service.logs import RateLimit
from matching.service.server import check_exposure, server_config
from tests.conftest import REPO
from tests.serve.conftest import running, serve_config
from tests.serve.images import random_png

TOKEN = "s3cret-token-0123456789"


def upload(blob: bytes, name: str = "q.png"):
    return [("files", (name, blob, "image/png"))]


def together(jobs):
    """Run the callables in threads released at once; their results in order."""
    barrier, out = threading.Barrier(len(jobs)), [None] * len(jobs)

    def run(i):
        barrier.wait()
        out[i] = jobs[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def test_batched_embeddings_equal_one_by_one_and_reach_their_callers(service):
    inner = service.embedder
    assert not inner.module.training  # eval mode: batch-norm does not mix requests
    rng = np.random.default_rng(0)
    requests = [
        rng.integers(0, 256, (n, 3, inner.image_size, inner.image_size), dtype=np.uint8)
        for n in (1, 2, 1, 3, 1, 1)
    ]
    batcher = MicroBatcher(inner, window_ms=200, max_batch=8)
    got = together([lambda x=x: batcher.embed(x) for x in requests])
    for x, out in zip(requests, got):
        np.testing.assert_allclose(out, inner.embed(x), atol=1e-5)
    assert max(batcher.batch_sizes) > 1 and max(batcher.batch_sizes) <= 8
    assert sum(batcher.batch_sizes) == sum(len(x) for x in requests)


def test_concurrent_match_answers_are_each_callers_own(service):
    """Distinct images from threads: each answer equals that image's single-request answer."""
    settings = replace(service.settings, batch_window_ms=100, max_batch=8)
    blobs = [random_png(500 + i) for i in range(6)]
    with TestClient(build_app(service.embedder, service.gallery, settings)) as c:
        alone = [c.post("/match", files=upload(b)).json()["results"][0] for b in blobs]
        jobs = [lambda b=b: c.post("/match", files=upload(b)).json()["results"][0] for b in blobs]
        together_ = together(jobs)
    for a, t in zip(alone, together_):
        assert [n["posting_id"] for n in t["neighbours"]] == [
            n["posting_id"] for n in a["neighbours"]
        ]
        np.testing.assert_allclose(
            [n["similarity"] for n in t["neighbours"]],
            [n["similarity"] for n in a["neighbours"]],
            atol=1e-5,
        )


class SlowEmbedder(Embedder):
    """Records each batch; the first one waits for `release`."""

    def __init__(self, inner: Embedder) -> None:
        self.inner, self.image_size, self.name, self.key = inner, inner.image_size, "slow", "k"
        self.release, self.batches = threading.Event(), []

    def embed(self, images):
        self.batches.append(len(images))
        self.release.wait(timeout=30)
        return self.inner.embed(images)


def test_a_request_the_model_does_not_reach_in_time_is_dropped(service):
    slow = SlowEmbedder(service.embedder)
    batcher = MicroBatcher(slow, window_ms=0, max_batch=1)
    x = np.zeros((1, 3, slow.image_size, slow.image_size), np.uint8)
    first = threading.Thread(target=batcher.embed, args=(x,))
    first.start()
    while not slow.batches:
        time.sleep(0.01)
    with pytest.raises(Busy, match="did not start on the request within 0.2 s"):
        batcher.embed(x + 1, timeout_s=0.2)
    slow.release.set()
    first.join(timeout=30)
    out = batcher.embed(x + 2, timeout_s=30)  # the dropped one never ran
    np.testing.assert_allclose(out, service.embedder.embed(x + 2), atol=1e-5)
    assert slow.batches == [1, 1]


def test_decoding_beyond_its_slots_gets_503_and_retry_after(service, monkeypatch):
    settings = replace(service.settings, max_decodes=1, queue_timeout_s=0.3)
    release, started, real = threading.Event(), threading.Event(), app_mod.decode_upload

    def slow_decode(*args):
        started.set()
        release.wait(timeout=30)
        return real(*args)

    monkeypatch.setattr(app_mod, "decode_upload", slow_decode)
    blob = random_png(7)
    with TestClient(build_app(service.embedder, service.gallery, settings)) as c:
        holder = {}
        first = threading.Thread(
            target=lambda: holder.update(r=c.post("/match", files=upload(blob)))
        )
        first.start()
        assert started.wait(timeout=30)
        t0 = time.monotonic()
        refused = c.post("/match", files=upload(blob))
        waited = time.monotonic() - t0
        health = c.get("/health")  # not queued behind the decoding
        release.set()
        first.join(timeout=30)
        after = c.post("/match", files=upload(blob))
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "max_decodes=1 requests are decoding" in refused.text
    assert "queue_timeout_s=0.3" in refused.text
    assert 0.25 <= waited < 5
    assert health.status_code == 200 and health.json()["max_decodes"] == 1
    assert holder["r"].status_code == 200 and after.status_code == 200


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed."""
    sock.settimeout(limit_s)
    t0, data = time.monotonic(), b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - t0


def test_a_stalled_body_gets_408_and_the_connection_closed(service):
    settings = replace(service.settings, body_timeout_s=1.0)
    head = (
        b"POST /match HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10000\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
    )
    with running(build_app(service.embedder, service.gallery, settings)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + b"--b\r\n" + b"x" * 3000)  # then nothing
            data, closed_after = read_until_closed(sock, 10)
    assert data.startswith(b"HTTP/1.1 408") and b"body_timeout_s=1" in data
    assert 0.9 <= closed_after < 4


def test_a_stalled_request_head_is_closed(service):
    app = build_app(service.embedder, service.gallery, service.settings)
    with running(app, header_timeout_s=0.5) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /match HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
            data, closed_after = read_until_closed(sock, 10)
    assert data == b"" and 0.4 <= closed_after < 3


def test_rate_limit_passes_a_burst_then_counts_what_it_dropped():
    now = [0.0]
    limit = RateLimit(burst=3, interval_s=10, clock=lambda: now[0])

    def record(msg, level=logging.ERROR):
        return logging.LogRecord("uvicorn.error", level, __file__, 1, msg, None, None)

    passed = [limit.filter(record("accept failed")) for _ in range(20)]
    assert passed == [True] * 3 + [False] * 17
    assert limit.filter(record("another failure"))  # another kind has its own budget
    assert all(limit.filter(record("access line", logging.INFO)) for _ in range(50))
    now[0] = 9.9
    assert not limit.filter(record("accept failed"))  # 18 dropped by now
    now[0] = 10.0
    summary = record("accept failed")
    assert limit.filter(summary)
    assert summary.getMessage() == "accept failed [18 more like this were not logged]"
    assert limit.filter(record("accept failed")) and limit.filter(record("accept failed"))
    assert not limit.filter(record("accept failed"))


def test_adding_postings_needs_the_token_when_one_is_set(service):
    settings = replace(service.settings, api_token=TOKEN)
    assert TOKEN not in repr(settings)
    blob, before = random_png(11), len(service.gallery)
    with TestClient(build_app(service.embedder, service.gallery, settings)) as c:
        missing = c.post("/gallery", files=upload(blob))
        wrong = c.post(
            "/gallery", files=upload(blob), headers={"Authorization": f"Bearer {TOKEN}x"}
        )
        assert len(service.gallery) == before
        right = c.post("/gallery", files=upload(blob), headers={"Authorization": f"Bearer {TOKEN}"})
        match = c.post("/match", files=upload(blob))  # matching needs no token
        health = c.get("/health")
    for r in (missing, wrong):
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer <api_token>" in r.json()["detail"]
    assert right.status_code == 201 and len(service.gallery) == before + 1
    top = match.json()["results"][0]["neighbours"][0]["posting_id"]
    assert top == right.json()["added"][0]
    assert health.json()["auth_required"] is True and TOKEN not in health.text
    with pytest.raises(ValueError, match="api_token must be at least 16 characters"):
        replace(service.settings, api_token="short")


def test_health_shows_no_paths(client, matching_run, service):
    text = client.get("/health").text
    for path in (matching_run.run_dir, service.settings.data_dir, REPO):
        assert str(Path(path).resolve()) not in text and str(path) not in text
    assert Path(matching_run.run_dir).name in client.get("/health").json()["model"]


def test_binding_beyond_loopback_needs_a_token_and_warns(caplog):
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_exposure(host, None)
    with pytest.raises(SystemExit, match="host=0.0.0.0 serves beyond this machine.*api_token"):
        check_exposure("0.0.0.0", None)
    with pytest.raises(SystemExit, match="MATCH_API_TOKEN"):
        check_exposure("match.example.org", "")
    with caplog.at_level(logging.WARNING, logger="matching.service.server"):
        check_exposure("0.0.0.0", TOKEN)
    assert "reachable from the network" in caplog.text


def test_code_defaults_are_the_yaml_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("MATCH_API_TOKEN", raising=False)
    cfg = serve_config(tmp_path)
    for f in fields(Settings):
        # allowed_hosts adds `host`; background null means the run's: both resolved at load;
        # titles is the run's rule (no key: the run decides)
        resolved = ("allowed_hosts", "background", "titles")
        if f.default is not f.default_factory and f.name not in resolved:
            assert cfg[f.name] == f.default, f.name
    params = inspect.signature(server_config).parameters
    for key in ("log_level", "max_connections", "header_timeout_s", "keep_alive_s"):
        assert cfg[key] == params[key].default, key
    monkeypatch.setenv("MATCH_API_TOKEN", TOKEN)
    assert serve_config(tmp_path).api_token == TOKEN


@pytest.mark.slow
def test_the_command_line_refuses_a_network_host_without_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv("MATCH_API_TOKEN", raising=False)
    cmd = [sys.executable, str(REPO / "product-matching/serve.py"), "host=0.0.0.0"]
    cmd.append(f"paths.data_dir={tmp_path / 'data'}")
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "host=0.0.0.0 serves beyond this machine" in proc.stdout + proc.stderr
