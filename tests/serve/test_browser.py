"""The web page in a real headless Chromium (Debian's, driven by Playwright): upload a
gallery posting's image, see that posting as the top match with its score and the threshold.

Needs `apt-get install chromium` and `pip install playwright` (both in .ci/run and
requirements/dev.txt); skipped, saying which is missing, without them. Playwright never
downloads a browser here: it starts the system one by path.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed (requirements/dev.txt)"
)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip("no chromium binary: apt-get install chromium", allow_module_level=True)

# Headless and quiet: no sandbox (CI runs as root), no GPU, and nothing that phones home
# (the closed network would otherwise fill the log with connection errors).
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield browser.new_page(viewport={"width": 1200, "height": 900})
        finally:
            browser.close()


def test_upload_on_the_page_shows_the_right_product(page, live_server, service, tmp_path):
    posting = service.gallery.postings()[6]
    page.goto(f"{live_server}/")
    page.wait_for_selector("#status:has-text('threshold')")
    page.set_input_files("#files", posting.image)
    page.click("#submit")
    page.wait_for_selector("#results[data-state=done]", state="attached", timeout=30_000)

    first = page.locator(".card").first
    assert first.get_attribute("data-posting-id") == posting.posting_id
    assert first.get_attribute("data-label-group") == posting.label_group
    assert "match" in first.get_attribute("class").split()
    assert float(first.locator(".score").inner_text().split()[0]) == pytest.approx(1.0, abs=1e-3)
    threshold = round(service.settings.threshold, 4)
    assert f"at threshold {threshold:g};" in page.inner_text(".summary")
    assert page.locator(".card").count() >= service.settings.top_k
    # Every thumbnail (served by GET /gallery/{id}/image) and the query preview loaded.
    # (Polled from here: wait_for_function evaluates strings in the page, which its CSP forbids.)
    deadline = time.monotonic() + 30
    while not page.evaluate(
        "() => Array.from(document.images).every((i) => i.complete && i.naturalWidth > 0)"
    ):
        assert time.monotonic() < deadline, "thumbnails did not load"
        time.sleep(0.1)
    page.screenshot(path=str(tmp_path / "serve_page.png"), full_page=True)
    assert (tmp_path / "serve_page.png").stat().st_size > 1000


def test_a_bad_upload_shows_the_servers_message(page, live_server, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    page.goto(f"{live_server}/")
    page.set_input_files("#files", str(notes))
    page.click("#submit")
    page.wait_for_selector("#results[data-state=error]", state="attached", timeout=30_000)
    assert "400: files[0] 'notes.txt' is not an image" in page.inner_text("#error")
    assert page.locator(".card").count() == 0
