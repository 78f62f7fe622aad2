"""The HTTP API through FastAPI's TestClient, checked against brute-force numpy on the
gallery's own embeddings."""

from __future__ import annotations

import inspect
import io
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from matching.service.app import build_app
from matching.service.images import decode_upload
from tests.serve.images import png_bytes, png_claiming, random_png, with_orientation


def posting_file(service, i: int) -> tuple[str, bytes]:
    posting = service.gallery.postings()[i]
    return posting.posting_id, Path(posting.image).read_bytes()


def files(*blobs: bytes, name: str = "q.png"):
    return [("files", (f"{i}-{name}", blob, "image/png")) for i, blob in enumerate(blobs)]


def brute_force(service, blob: bytes) -> tuple[list[str], np.ndarray]:
    """Gallery ids by decreasing cosine similarity to the image, and the similarities."""
    size, limit = service.embedder.image_size, service.settings.max_pixels
    query = service.embedder.embed(decode_upload(blob, "q", size, limit)[0][None])[0]
    gallery = service.gallery.embeddings()
    sims = gallery @ (query / np.linalg.norm(query))
    order = np.argsort(-sims, kind="stable")
    ids = [p.posting_id for p in service.gallery.postings()]
    return [ids[i] for i in order], sims[order]


def test_health_and_openapi(client, service):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["backend"] == "torch"
    assert health["gallery_size"] == len(service.gallery) > 10
    assert health["threshold"] == service.settings.threshold
    assert health["embedding_dim"] == service.gallery.dim and health["image_size"] == 32
    spec = client.get("/openapi.json").json()
    assert {"/match", "/gallery", "/health", "/gallery/{posting_id}/image"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/match"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


def test_threshold_is_the_one_the_run_chose(loaded, matching_run):
    from matching.infer import run_threshold
    from shared.run_loading import load_run

    stored = run_threshold(load_run(matching_run.run_dir))
    assert stored is not None and loaded.settings.threshold == pytest.approx(stored)


def test_a_gallery_image_matches_its_own_posting_first(client, service):
    for i in (0, 5, len(service.gallery) - 1):
        pid, blob = posting_file(service, i)
        body = client.post("/match", files=files(blob)).json()
        (result,) = body["results"]
        top = result["neighbours"][0]
        assert top["posting_id"] == pid and top["similarity"] == pytest.approx(1.0, abs=1e-4)
        assert result["matches"][0]["posting_id"] == pid
        assert top["image_url"] == f"/gallery/{pid}/image"


def test_an_image_only_run_ignores_titles(client, service):
    """The tiny run was trained without titles: a title sent with the image changes
    nothing (`by_title` false, `titles` null); one per file, as for POST /gallery."""
    pid, blob = posting_file(service, 4)
    title = service.gallery.get(pid).title
    assert title and service.settings.titles is None
    plain = client.post("/match", files=files(blob)).json()
    titled = client.post("/match", files=files(blob), data={"title": title}).json()
    assert titled == plain and plain["titles"] is None
    assert not titled["results"][0]["by_title"]
    r = client.post("/match", files=files(blob, blob), data={"title": title})
    assert r.status_code == 422 and "title: 1 value(s) for 2 file(s)" in r.json()["detail"]
    assert client.get("/health").json()["titles"] is None


def neighbours(client, blob: bytes) -> list[tuple[str, float]]:
    body = client.post("/match", files=files(blob)).json()
    return [(n["posting_id"], n["similarity"]) for n in body["results"][0]["neighbours"]]


def test_an_exif_rotated_phone_photo_matches_as_the_upright_image(client, service):
    """A gallery image saved turned, with the EXIF tag that turns it back (lossless, so the
    pixels are comparable): exactly the upright image's neighbours, its own posting first.
    (JPEG orientation is checked pixel by pixel in tests/shared/data/test_decode.py.)"""
    for i in (1, 9):
        pid, blob = posting_file(service, i)
        upright = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
        expected = neighbours(client, blob)
        assert expected[0][0] == pid
        for orientation in (6, 8):
            got = neighbours(client, with_orientation(upright, orientation))
            assert [p for p, _ in got] == [p for p, _ in expected]
            np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)


def test_transparent_pixels_take_the_services_background(service):
    """A fully transparent upload matches as a plain image of the background colour."""
    clear = png_bytes(np.zeros((32, 32, 4), np.uint8))
    for background in ((255, 255, 255), (30, 160, 90)):
        settings = replace(service.settings, background=background)
        with TestClient(build_app(service.embedder, service.gallery, settings)) as c:
            solid = png_bytes(np.full((32, 32, 3), background, np.uint8))
            assert neighbours(c, clear) == neighbours(c, solid)


def test_neighbours_are_the_brute_force_ranking(client, service):
    _, blob = posting_file(service, 3)
    ids, sims = brute_force(service, blob)
    body = client.post("/match?top_k=12", files=files(blob)).json()
    got = body["results"][0]["neighbours"]
    assert body["top_k"] == 12 and len(got) == 12
    np.testing.assert_allclose([n["similarity"] for n in got], sims[:12], atol=1e-5)
    # Ids agree wherever the similarities are not tied (ties may come in either order).
    gaps = np.diff(sims[:13])
    for j, n in enumerate(got):
        if (j == 0 or gaps[j - 1] < -1e-5) and gaps[j] < -1e-5:
            assert n["posting_id"] == ids[j]


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_matches_are_every_posting_at_or_above_the_threshold(service, quantile):
    _, blob = posting_file(service, 8)
    ids, sims = brute_force(service, random_png(7))  # a query that is not in the gallery
    threshold = float(np.quantile(sims[:50], quantile))
    settings = replace(service.settings, threshold=threshold, min2=None)
    with TestClient(build_app(service.embedder, service.gallery, settings)) as c:
        body = c.post("/match", files=files(random_png(7))).json()
    got = {m["posting_id"]: m["similarity"] for m in body["results"][0]["matches"]}
    expected = {i for i, s in zip(ids[:50], sims[:50]) if s >= threshold + 1e-5}
    borderline = {i for i, s in zip(ids[:50], sims[:50]) if abs(s - threshold) <= 1e-5}
    assert expected <= set(got) <= expected | borderline
    assert body["threshold"] == threshold and len(got) >= 1


def test_min2_keeps_the_nearest_posting_of_a_lonely_query(service):
    ids, sims = brute_force(service, random_png(9))
    strict = replace(service.settings, threshold=float(sims[0]) + 0.01)
    for min2, expected in ((None, []), (float(sims[0]) - 0.01, [ids[0]])):
        settings = replace(strict, min2=min2)
        with TestClient(build_app(service.embedder, service.gallery, settings)) as c:
            result = c.post("/match", files=files(random_png(9))).json()["results"][0]
        assert [m["posting_id"] for m in result["matches"]] == expected


def test_several_images_in_one_request(client, service):
    blobs = [posting_file(service, i) for i in (1, 2, 4)]
    body = client.post("/match?top_k=3", files=files(*[b for _, b in blobs])).json()
    assert [r["neighbours"][0]["posting_id"] for r in body["results"]] == [p for p, _ in blobs]
    assert [r["file"] for r in body["results"]] == [f"files[{i}] '{i}-q.png'" for i in range(3)]


def test_added_posting_is_found_at_once_and_stored_under_data_dir(client, service, tmp_path):
    blob = random_png(11)
    before = len(service.gallery)
    r = client.post(
        "/gallery",
        files=files(blob, name="../../../evil.png"),
        data={"posting_id": "new-1", "label_group": "g-new", "title": "<b>New</b> thing"},
    )
    assert r.status_code == 201, r.text
    assert r.json() == {"added": ["new-1"], "gallery_size": before + 1}
    top = client.post("/match", files=files(blob)).json()["results"][0]["neighbours"][0]
    assert top["posting_id"] == "new-1" and top["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert top["label_group"] == "g-new" and top["title"] == "<b>New</b> thing"
    assert client.get("/gallery/new-1/image").content == blob
    # The one file written is under data_dir/gallery_images, named by the service.
    data_dir = service.settings.data_dir
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 1 and written[0].parent == data_dir / "gallery_images"
    assert written[0].suffix == ".png" and "evil" not in written[0].name


def test_added_postings_get_generated_ids(client, service):
    r = client.post("/gallery", files=files(random_png(12), random_png(13)))
    assert r.status_code == 201
    added = r.json()["added"]
    assert len(added) == 2 and all(service.gallery.get(pid) for pid in added)


def status_and_detail(response) -> tuple[int, str]:
    return response.status_code, str(response.json()["detail"])


def test_bad_uploads_get_a_4xx_naming_the_file(client, service):
    _, good = posting_file(service, 0)
    cases = {
        "notes.txt": (b"just some text\n", 400, "is not an image"),
        "half.png": (good[: len(good) // 2], 400, "truncated or corrupt"),
        "bomb.png": (png_claiming(100_000, 100_000), 413, "decompression"),
        "empty.png": (b"", 400, "is empty"),
    }
    for name, (blob, status, message) in cases.items():
        for url in ("/match", "/gallery"):
            pair = [("files", ("ok.png", good, "image/png")), ("files", (name, blob, "image/png"))]
            r = client.post(url, files=pair)
            code, detail = status_and_detail(r)
            assert code == status and message in detail and f"files[1] '{name}'" in detail
    assert len(service.gallery) == len(service.gallery.postings())  # nothing half-added
    assert not service.settings.data_dir.exists()  # and nothing written


def test_missing_or_malformed_fields(client, service):
    _, good = posting_file(service, 0)
    r = client.post("/match")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "files"]
    r = client.post("/match", data={"file": "x"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "files"]
    assert client.post("/match?top_k=0", files=files(good)).status_code == 422
    assert client.post("/match?top_k=101", files=files(good)).status_code == 422
    for bad_id in ("../../etc/passwd", "a/b", "..", "x" * 65, " /abs"):
        r = client.post("/gallery", files=files(good), data={"posting_id": bad_id})
        code, detail = status_and_detail(r)
        assert code == 422 and "is not allowed" in detail, bad_id
    r = client.post("/gallery", files=files(good, good), data={"posting_id": ["a1"]})
    code, detail = status_and_detail(r)
    assert code == 422 and "posting_id: 1 value(s) for 2 file(s)" in detail
    existing = service.gallery.postings()[0].posting_id
    r = client.post("/gallery", files=files(good), data={"posting_id": existing})
    assert r.status_code == 409 and existing in r.text
    r = client.post("/gallery", files=files(good, good), data={"posting_id": ["z1", "z1"]})
    assert r.status_code == 422 and "more than once" in r.text
    r = client.post("/match", files=files(*[good] * 17))
    assert r.status_code == 413 and "max_files=16" in r.text
    assert client.get("/gallery/nope/image").status_code == 404
    assert client.get("/gallery/..%2F..%2Fetc%2Fpasswd/image").status_code == 404
    assert not service.settings.data_dir.exists()


def test_the_pixels_of_a_whole_request_are_budgeted_before_decoding(service, monkeypatch):
    """Each image under max_pixels, but together over max_request_pixels: 413 before any
    image is decoded (16 large images would otherwise cost minutes of CPU)."""
    import matching.service.app as app_mod

    decoded = []
    real = app_mod.decode_upload
    monkeypatch.setattr(app_mod, "decode_upload", lambda *a: decoded.append(a) or real(*a))
    settings = replace(service.settings, max_pixels=4_000_000, max_request_pixels=10_000_000)
    _, good = posting_file(service, 0)
    large = png_claiming(2000, 2000)  # 4 M pixels each: allowed alone
    with TestClient(build_app(service.embedder, service.gallery, settings)) as c:
        r = c.post("/match", files=files(good, large, large, large))
        code, detail = status_and_detail(r)
        assert code == 413 and "above max_request_pixels=10000000" in detail
        assert "12" in detail.split("pixels")[0]  # 12,000,000 and some: the total named
        assert decoded == []  # refused from the headers alone
        assert c.get("/health").json()["max_request_pixels"] == 10_000_000
        assert c.post("/match", files=files(good, good)).status_code == 200  # under budget


def test_health_answers_while_the_gallery_is_locked(client, service):
    """A long addition holds the gallery's lock (6.8 s at 300k postings): /health must not
    wait for it, nor for a thread-pool worker."""
    route = next(r for r in client.app.routes if getattr(r, "path", "") == "/health")
    assert inspect.iscoroutinefunction(route.endpoint)  # on the event loop, not the pool
    with service.gallery._lock:  # what a long addition holds
        done = {}
        worker = threading.Thread(target=lambda: done.update(r=client.get("/health")))
        worker.start()
        worker.join(timeout=20)
        assert not worker.is_alive(), "/health waited for the gallery lock"
    assert done["r"].status_code == 200 and done["r"].json()["gallery_size"] == len(service.gallery)


def test_other_hosts_and_cross_origin_posts_are_refused(client, service):
    """DNS rebinding sends the attacker's host name; a page of another origin sends its
    Origin. Both are refused before the request reaches the gallery; the service's own page
    (same origin) and scripts (no Origin) pass."""
    _, good = posting_file(service, 0)
    rebound = client.get("/health", headers={"Host": "evil.example:8000"})
    assert rebound.status_code == 421 and "'evil.example:8000' is not served" in rebound.text
    before = len(service.gallery)
    r = client.post("/gallery", files=files(good), headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-origin POST from 'http://evil.example'" in r.text
    assert len(service.gallery) == before and not service.settings.data_dir.exists()
    same = client.post("/match", files=files(good), headers={"Origin": "http://testserver"})
    assert same.status_code == 200
    assert client.post("/match", files=files(good)).status_code == 200  # no Origin: a script
    loopback = client.get("/health", headers={"Host": "127.0.0.1:8000"})
    assert loopback.status_code == 200


def test_request_body_limit(service):
    settings = replace(service.settings, max_upload_mb=0.05)  # 52428 bytes
    _, good = posting_file(service, 0)
    big = good + b"\0" * 60_000
    with TestClient(build_app(service.embedder, service.gallery, settings)) as c:
        declared = c.post("/match", files=files(big))  # httpx sends Content-Length
        boundary = "XyZ"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.png"'
                f"\r\nContent-Type: image/png\r\n\r\n"
            ).encode()
            + big
            + f"\r\n--{boundary}--\r\n".encode()
        )
        chunked = c.post(  # no Content-Length: the bytes are counted as they arrive
            "/match",
            content=iter([body[i : i + 8192] for i in range(0, len(body), 8192)]),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        small = c.post("/match", files=files(good))
    assert "content-length" not in chunked.request.headers
    for r in (declared, chunked):
        assert r.status_code == 413 and "max_upload_mb=0.05" in r.json()["detail"]
    assert small.status_code == 200


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert 'id="files"' in html and "/match" in html and "threshold" in html
    assert "http://" not in html and "https://" not in html  # no CDN, fonts or trackers
    assert "innerHTML" not in html  # server text goes in as textContent only
    assert "default-src 'none'" in r.headers["content-security-policy"]


def test_concurrent_adds_and_matches(service):
    """Clients add postings while others match: every match of a gallery image still finds
    its own posting first, and every add lands exactly once."""
    app = build_app(service.embedder, service.gallery, service.settings)
    before = len(service.gallery)
    queries = [posting_file(service, i) for i in range(0, before, max(1, before // 6))]
    errors: list[str] = []

    def adder(w: int):
        with TestClient(app) as c:
            for b in range(4):
                blob, pid = random_png(1000 + 10 * w + b), f"c{w}-{b}"
                r = c.post("/gallery", files=files(blob), data={"posting_id": pid})
                if r.status_code != 201:
                    errors.append(r.text)

    def matcher():
        with TestClient(app) as c:
            for pid, blob in queries:
                r = c.post("/match", files=files(blob))
                if (
                    r.status_code != 200
                    or r.json()["results"][0]["neighbours"][0]["posting_id"] != pid
                ):
                    errors.append(r.text[:200])

    threads = [threading.Thread(target=adder, args=(w,)) for w in range(3)]
    threads += [threading.Thread(target=matcher) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(service.gallery) == before + 12
    with TestClient(app) as c:
        for w in range(3):
            for b in range(4):
                blob = random_png(1000 + 10 * w + b)
                top = c.post("/match", files=files(blob)).json()["results"][0]["neighbours"][0]
                assert top["posting_id"] == f"c{w}-{b}"
    stored = list((service.settings.data_dir / "gallery_images").iterdir())
    assert len(stored) == 12
