"""The page in a real browser (Debian's chromium driven by Playwright) against a real server process.

Type a query, see result cards whose thumbnails loaded, apply a filter, open a study, "more like
this", drop a DICOM file on the image query. With ``CXR_SEARCH_SCREENSHOT=PATH`` the results page
is saved there (the README's ``docs/img/serve.png`` is made this way).
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import pytest

from tests.helpers.index_data import ground_truth
from tests.helpers.serve import serve, stop
from tests.helpers.system import need_module, need_program

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run"]
_ALL_LOADED = ("() => { const imgs = Array.from(document.querySelectorAll('article.card img'));"
               " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }")


@pytest.fixture(scope="module")
def browser_index(tiny_model, tmp_path_factory: pytest.TempPathFactory):
    """A demo-like archive (24 studies, 256-pixel images, reports) and its index."""
    from cxr_search.synth import synthesize
    from index.build import BuildOptions, build

    root = tmp_path_factory.mktemp("browser")
    synthesize(root / "archive", studies=24, seed=5, layout="pacs", broken=0, image_size=256)
    build(root / "archive", root / "index", tiny_model,
          BuildOptions(reports_csv=root / "archive" / "reports.csv", batch_size=8))
    return root / "archive", root / "index"


def _all_thumbnails_loaded(page) -> None:
    page.wait_for_function(_ALL_LOADED, timeout=30_000)


def test_search_filter_study_like_and_drop(browser_index, tmp_path: Path) -> None:
    chromium = need_program("chromium", "chromium")
    need_module("playwright", "dev")
    from playwright.sync_api import sync_playwright

    archive, index = browser_index
    with serve(index, tmp_path / "state") as (base, proc), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            # Type a query: result cards with loaded thumbnails.
            page.goto(base + "/")
            page.fill("#q", "large right pleural effusion")
            page.click("#search-button")
            page.wait_for_url(re.compile(r".*q=large\+right\+pleural\+effusion.*"))
            assert page.locator("article.card").count() == 20
            _all_thumbnails_loaded(page)
            shot = os.environ.get("CXR_SEARCH_SCREENSHOT")
            if shot:
                Path(shot).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=shot, full_page=False)

            # A filter: the URL carries it, every card obeys it.
            page.check("input[name=view][value=PA]")
            page.click("#search-button")
            page.wait_for_url(re.compile(r".*view=PA.*"))
            views = page.locator("article.card .view").all_inner_texts()
            assert views and set(views) == {"PA"}
            _all_thumbnails_loaded(page)

            # A study page: its views load; then "more like this" on one of them.
            page.locator("article.card .actions a", has_text="Study").first.click()
            page.wait_for_url(re.compile(r".*/studies/.*"))
            assert page.locator("h2", has_text="Report").count() == 1
            page.wait_for_function("() => Array.from(document.querySelectorAll('.view-card img'))"
                                   ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
            page.locator(".view-card a.like").first.click()
            page.wait_for_url(re.compile(r".*like=\d+.*"))
            assert page.locator("article.card").count() > 0
            _all_thumbnails_loaded(page)

            # Drop a DICOM file on the image query.
            dcm = archive / ground_truth(archive)[0]["path"]
            page.goto(base + "/")
            data = base64.b64encode(dcm.read_bytes()).decode("ascii")
            with page.expect_navigation():
                page.evaluate("""(b64) => {
                    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                    const dt = new DataTransfer();
                    dt.items.add(new File([bytes], 'query.dcm', {type: 'application/dicom'}));
                    const drop = document.getElementById('drop');
                    drop.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true, cancelable: true}));
                    drop.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
                }""", data)
            assert "uploaded DICOM image" in page.inner_text("h1.title")
            assert page.locator("article.card").count() > 0
            _all_thumbnails_loaded(page)

            # A tablet-sized window: no horizontal scrolling.
            page.set_viewport_size({"width": 820, "height": 1180})
            assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
            assert not errors, errors  # no CSP violation or script error in the console
        finally:
            browser.close()
        assert stop(proc) in (0, -15)
