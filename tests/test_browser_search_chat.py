"""Issue 18's new controls in a real browser (Debian chromium, headless), set up as
tests/test_browser.py: chat undo / edit / replace / export and top answers with scores; on the
retrieval side more like this, the minimum score with its note, the combined query, results as
JSON, and a gallery downloaded and loaded back. On the tiny random model (its words are noise:
the checks are on what the controls do, not on what the model says).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from test_browser import (  # the shared set-up (skips this module too when chromium is missing)
    CAT,
    LAPTOP,
    TIMEOUT_MS,
    app_url,  # noqa: F401  # fixture, requested by `page`
    ask_in_chat,
    browser,  # noqa: F401  # fixture, requested by `page`
    index_three_photos,
    open_page,
    open_tab,
    screenshot,
    set_slider,
    sync_api,
    upload,
    wait_idle,
)


@pytest.fixture
def page(browser, app_url):  # noqa: F811  # fixtures imported above
    context, page = open_page(browser, app_url, LAPTOP)
    yield page
    context.close()


# --------------------------------------------------------------------------- tabs


def download(page, button: str, file_box: str) -> Path:
    """Click `button`, wait for the link in `file_box`, download it, return where it was saved."""
    page.locator(button).click()
    link = page.locator(f"{file_box} a").first
    link.wait_for(timeout=TIMEOUT_MS)
    with page.expect_download() as info:
        link.click()
    target = Path(tempfile.mkdtemp()) / info.value.suggested_filename
    info.value.save_as(target)
    return target


def chat_turns(page) -> list[str]:
    return [t.strip() for t in page.locator('#chatbot [data-testid="user"]').all_inner_texts()]


def test_chat_undo_edit_replace_and_export(page):
    open_tab(page, "Chat")
    upload(page, "#chat-image", CAT)
    page.locator("#chat-image img").first.wait_for()
    ask_in_chat(page, ["What is in the picture?", "What colour is it?"])
    box = page.locator("#chat-message textarea")
    page.locator("#chat-undo").click()
    sync_api.expect(page.locator('#chatbot [data-testid="user"]')).to_have_count(1)
    assert chat_turns(page) == ["What is in the picture?"]
    page.locator("#chat-edit").click()
    sync_api.expect(box).to_have_value("What is in the picture?")
    box.fill("Is it an animal?")
    page.locator("#chat-replace").click()
    sync_api.expect(page.locator('#chatbot [data-testid="user"]')).to_have_text(["Is it an animal?"])
    page.locator('#chatbot [data-testid="bot"]').first.wait_for()
    wait_idle(page, "#chatbot")
    page.get_by_text("Export the conversation").click()
    page.locator("#chat-export-format").get_by_text("json").click()
    exported = json.loads(download(page, "#chat-export", "#chat-export-file").read_text())
    assert [t["question"] for t in exported["turns"]] == ["Is it an animal?"]
    assert exported["image"]["name"].endswith(Path(CAT).name.split(".")[0] + Path(CAT).suffix)
    screenshot(page, "tiny-chat-undo-export")


def test_top_answers_with_scores(page):
    open_tab(page, "Chat")
    upload(page, "#chat-image", CAT)
    page.locator("#chat-image img").first.wait_for()
    page.get_by_text("Quick answer: one question, no history").click()
    page.get_by_label("Question", exact=True).fill("What is it?")
    page.locator("#answer-topk-button").click()
    output = page.locator("#answer-topk-output")
    sync_api.expect(output).to_contain_text("score", timeout=TIMEOUT_MS)
    assert "answer" in output.inner_text()


def test_retrieval_more_like_this_minimum_score_combined_and_keeping_the_gallery(page):
    status = index_three_photos(page)

    page.locator("#search-query textarea").fill("a cat")
    page.locator("#search-button").click()
    page.wait_for_function("() => document.querySelectorAll('#search-results img').length === 3")
    sync_api.expect(page.locator("#results-note")).to_contain_text("3 results")
    results = json.loads(download(page, "#download-results", "#results-file").read_text())
    assert [r["rank"] for r in results["results"]] == [1, 2, 3]

    page.locator("#search-results .thumbnail-item").first.click()  # select the first result
    page.wait_for_timeout(500)  # the select event (UI only) fills the hidden item box
    page.locator("#more-like-this").click()
    sync_api.expect(page.locator("#results-note")).to_have_text("2 results.", timeout=TIMEOUT_MS)
    assert results["results"][0]["name"] not in page.locator("#search-results").inner_text()

    set_slider(page, "#min-score", "1")  # no cosine reaches 1: everything is hidden, and said so
    page.locator("#search-button").click()
    sync_api.expect(page.locator("#results-note")).to_contain_text(
        "3 results under the minimum cosine 1.00 hidden"
    )
    set_slider(page, "#min-score", "0")

    page.get_by_role("tab", name="Combined").click()
    page.locator("#combined-text textarea").fill("a photo")
    page.locator("#combined-negative textarea").fill("a rocket")
    page.locator("#combined-button").click()
    sync_api.expect(page.locator("#results-note")).to_have_text("3 results.", timeout=TIMEOUT_MS)

    page.get_by_text("Keep this gallery").click()
    archive = download(page, "#download-gallery", "#gallery-archive")
    page.locator("#clear-gallery").click()
    sync_api.expect(status).to_have_value("Cleared the gallery (3 images).")
    upload(page, "#gallery-load-file", str(archive))
    page.locator("#load-gallery").click()
    sync_api.expect(status).to_have_value("Loaded a gallery of 3 images.", timeout=TIMEOUT_MS)
    page.wait_for_function("() => document.querySelectorAll('#gallery-preview img').length === 3")
    screenshot(page, "tiny-retrieval-keep")
