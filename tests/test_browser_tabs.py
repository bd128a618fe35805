"""The Batch and Explain tabs in a real browser (Debian chromium, headless), with the set-up of
test_browser.py: upload, run, see the table / the heatmap, download a file and read it back.
Both run on the bundled demo model with its own pictures (assets/shapes/), so the screenshots,
copied to docs/screenshots/, show real captions and maps."""

from __future__ import annotations

import csv
import io

import pytest
from PIL import Image
from test_browser import (  # the shared set-up (skips this module too when chromium is missing)
    CIRCLE_CROSS_TRIANGLE,
    HOSTILE,
    LAPTOP,
    SHAPES,
    browser,  # noqa: F401  # fixture, requested by name below
    demo_url,  # noqa: F401  # fixture, requested by name below
    open_page,
    open_tab,
    screenshot,
    upload,
    wait_idle,
)

pytestmark = pytest.mark.browser
PICTURES = [SHAPES[name] for name in sorted(SHAPES)[:3]]


def table_rows(page) -> list[list[str]]:
    return page.eval_on_selector_all(
        "#batch-table div[role=row]",
        "rows => rows.map(r => Array.from(r.querySelectorAll('[role=gridcell]')).map(c => c.innerText.trim()))",
    )


def test_batch_tab_captions_a_set_and_downloads_the_csv(browser, demo_url):  # noqa: F811  # fixtures imported above
    context, page = open_page(browser, demo_url, LAPTOP)
    try:
        open_tab(page, "Batch")
        upload(page, "#batch-files", [*PICTURES, str(HOSTILE / "made_random_bytes.jpg")])
        page.wait_for_function("() => document.querySelectorAll('#batch-files tbody tr').length === 4")
        page.locator("#batch-question textarea").fill("what colour is the circle?")
        page.locator("#batch-button").click()
        page.wait_for_function(
            "() => document.querySelector('#batch-table').innerText.includes('not a recognised image format')"
        )
        wait_idle(page, "#batch-table")
        rows = table_rows(page)
        assert [r[0] for r in rows][-1] == "made_random_bytes.jpg"
        assert rows[-1][-1] == "This file is not a recognised image format."
        assert all(r[-1] == "ok" and r[1] for r in rows[:3])
        screenshot(page, "batch-tab", docs=True)
        link = page.locator("#batch-downloads a[download='captions.csv']")
        with page.expect_download() as info:
            link.click()
        text = open(info.value.path(), encoding="utf-8").read()  # noqa: SIM115  # Playwright's temp file
        parsed = list(csv.reader(io.StringIO(text)))
        assert parsed[0] == ["file", "caption", "answer", "status"]
        assert [r[0] for r in parsed[1:]] == [r[0] for r in rows] and parsed[-1][-1] == rows[-1][-1]
    finally:
        context.close()


def test_explain_tab_draws_the_heatmap_and_ranks_labels(browser, demo_url):  # noqa: F811  # fixtures imported above
    context, page = open_page(browser, demo_url, LAPTOP)
    try:
        open_tab(page, "Explain")
        upload(page, "#explain-image", CIRCLE_CROSS_TRIANGLE)
        page.wait_for_selector("#explain-image img")
        page.locator("#explain-text textarea").fill("the red triangle")
        page.locator("#explain-button").click()
        page.wait_for_selector("#explain-heatmap img")
        page.wait_for_function("() => document.querySelectorAll('#explain-words img').length == 3")
        page.wait_for_selector("#match-meaning >> text=ITM")
        page.locator("#classify-labels textarea").fill("red, green, blue, yellow, purple, orange")
        page.locator("#classify-button").click()
        page.wait_for_selector("#classify-output >> text=%")
        wait_idle(page, "#classify-output")
        screenshot(page, "explain-tab", docs=True)
        # The heatmap downloads as a picture of the drawn size.
        with page.expect_download() as info:
            page.locator("#explain-heatmap").hover()
            page.locator(
                "#explain-heatmap a[download], #explain-heatmap button[aria-label*='ownload']"
            ).first.click()
        assert Image.open(info.value.path()).size == (384, 384)
    finally:
        context.close()
