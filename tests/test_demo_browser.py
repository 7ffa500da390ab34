"""The Gradio demo in a real browser (headless Chromium through Playwright): search, then segmentation.

Screenshots go to a temporary folder; with VLKIT_SCREENSHOTS=1 they replace docs/images/demo_search.png
and docs/images/demo_segment.png. VLKIT_DEMO_BACKBONE=DIR (a saved backbone, e.g. a trained
cached:vlkit-tiny-shapes) and VLKIT_DEMO_IMAGES=N make those pictures show a trained model's results;
by default the test uses a random tiny backbone and 8 images, which is all it needs to check the page.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
DOCS_IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"
TIMEOUT_MS = 30_000
SEGMENT_EXAMPLE = 1  # a yellow and a blue triangle and a purple cross: queried by the shape name alone

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
    # Gradio's own pandas calls (its queue statistics) warn under pandas 3; nothing of ours
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from vlkit.demos.app import build_app, load_tabs
    from vlkit.demos.testing import make_tiny_demo, serve
    from vlkit.index.retriever import Retriever

    root = tmp_path_factory.mktemp("demo-browser")
    tiny = make_tiny_demo(root, n_images=int(os.environ.get("VLKIT_DEMO_IMAGES", "8")),
                          backbone=os.environ.get("VLKIT_DEMO_BACKBONE") or None)
    retriever = Retriever.load(tiny.index, progress=False)
    # the shipped head when the backbone is the shipped one (as `vlkit demo`), else training-free
    app = build_app(retriever, load_tabs(retriever.backbone), examples=tiny.examples)
    url = serve(app)
    try:
        yield url, tiny
    finally:
        app.close()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    url, _ = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        outside: list[str] = []

        def local_only(route):  # the test talks to 127.0.0.1 only; anything else is refused and recorded
            if urlparse(route.request.url).hostname == "127.0.0.1":
                return route.continue_()
            outside.append(route.request.url)
            return route.abort()

        context.route("**/*", local_only)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        yield page
        context.close()
        browser.close()
        assert not outside, f"the page tried to reach other hosts: {outside[:5]}"


def _shot(page, name: str, tmp_path: Path) -> Path:
    out = DOCS_IMAGES if os.environ.get("VLKIT_SCREENSHOTS") == "1" else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / name), full_page=True)
    return out / name


def test_search_tab_shows_a_gallery_and_captions(page, server, tmp_path):
    _, tiny = server
    page.locator("#search-k input[type=number]").fill("8")
    page.locator("#search-query textarea").fill("a red circle")
    page.locator("#search-button").click()
    shown = page.locator("#search-results img")
    shown.first.wait_for(state="visible")
    assert 1 <= shown.count() <= 8
    assert "images for “a red circle”" in page.locator("#search-status").inner_text()
    assert "parameters" in page.locator("#backbone-info").inner_text()
    page.locator("#search-image input[type=file]").set_input_files(tiny.examples[0][0])
    page.locator("#search-image img").first.wait_for(state="visible")  # the upload finished
    page.locator("#image-to-text-button").click()
    page.get_by_text("captions for the query image").wait_for()
    assert page.locator("#caption-results tbody tr").count() >= 1
    _shot(page, "demo_search.png", tmp_path)


def test_segmentation_tab_shows_an_overlay(page, server, tmp_path):
    _, tiny = server
    image, query = tiny.examples[SEGMENT_EXAMPLE]
    query = query.split()[-1]  # the category name: every instance of it
    page.get_by_role("tab", name="Segmentation").click()
    page.locator("#segment-image input[type=file]").set_input_files(image)
    page.locator("#segment-image img").first.wait_for(state="visible")  # the upload finished
    page.locator("#segment-query textarea").fill(query)
    page.locator("#segment-button").click()
    page.get_by_text(f"of “{query}”").wait_for()
    page.wait_for_function("() => { const i = document.querySelector('#segment-overlay img');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    _shot(page, "demo_segment.png", tmp_path)
