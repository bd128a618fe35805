"""The page in a real browser: Playwright for Python driving Debian's chromium, headless.

Two apps are served. On the tiny random model (its words are noise, it starts in seconds): upload
an image on every tab, caption it, chat twice (watching the answer stream in), index three images
and search them, a bad file, phone width. On the bundled demo model (shapes-demo) with its own
pictures (assets/shapes/), so the answers are real and can be checked: a caption, a chat, a search
and the Model tab, whose screenshots are copied to docs/screenshots/ for the README and docs.
Every screenshot also goes to test-artifacts/screenshots/.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("BLIP2_TINY_CACHE", tempfile.mkdtemp(prefix="blip2-tiny-"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM = Path("/usr/bin/chromium")


def _missing(reason: str) -> None:
    """Skip, except in CI (.ci/run sets BLIP2_REQUIRE_BROWSER=1), where a missing browser fails."""
    if os.environ.get("BLIP2_REQUIRE_BROWSER") == "1":
        pytest.fail(reason + ", and BLIP2_REQUIRE_BROWSER=1", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


if not CHROMIUM.exists():
    _missing(
        "Debian chromium is not installed at /usr/bin/chromium (apt-get install chromium); "
        "browser tests need it and never download a browser"
    )
try:
    from playwright import sync_api
except ImportError:
    _missing("the playwright Python package is not installed")

from blip2_app.config import Settings  # noqa: E402
from blip2_app.startup import load_engine  # noqa: E402
from blip2_app.ui import build_demo, launch_options  # noqa: E402

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = {p.stem: str(p) for p in sorted((ROOT / "assets" / "examples").glob("*.*"))}
CAT = PHOTOS["skimage_chelsea"]
THREE = [PHOTOS["skimage_chelsea"], PHOTOS["skimage_coffee"], PHOTOS["skimage_rocket"]]
# The demo model's own world: held-out test scenes of blip2_app.training.synthetic (assets/shapes/).
SHAPES = {p.stem: str(p) for p in sorted((ROOT / "assets" / "shapes").glob("*.png"))}
# A small yellow circle on the left, a small green cross in the middle, a large red triangle on the right.
CIRCLE_CROSS_TRIANGLE = SHAPES["shapes_test_000007"]
HOSTILE = ROOT / "tests" / "data" / "hostile"
ARTIFACTS = ROOT / "test-artifacts" / "screenshots"
DOCS = ROOT / "docs" / "screenshots"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
LAPTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 60_000
STREAM_DELAY_S = 0.04  # per streamed piece, so the browser can be seen receiving them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model: str, pace_stream: bool = False):
    """The app on `model` at a free port, example captions cached lazily (as on a Space)."""
    port = free_port()
    settings = Settings.from_sources(
        ["--model", model, "--port", str(port), "--cache-examples", "lazy"], env={}
    )
    engine = load_engine(settings)
    if pace_stream:
        # The tiny model writes 30 tokens in a few milliseconds; pace the stream like a real model
        # so the test can watch the answer grow in the page (the engine and the UI are unchanged).
        stream = engine.chat_stream

        def paced(*args, **kwargs):
            for text in stream(*args, **kwargs):
                time.sleep(STREAM_DELAY_S)
                yield text

        engine.chat_stream = paced
    demo = build_demo(settings, engine)
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_options(settings))
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def app_url():
    with serving("tiny-random", pace_stream=True) as url:
        yield url


@pytest.fixture(scope="module")
def demo_url():
    with serving("shapes-demo") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url: str, viewport: dict[str, int]):
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#caption-image")
    return context, page


@pytest.fixture
def page(browser, app_url):
    context, page = open_page(browser, app_url, LAPTOP)
    yield page
    context.close()


@pytest.fixture
def demo_page(browser, demo_url):
    context, page = open_page(browser, demo_url, LAPTOP)
    yield page
    context.close()


def screenshot(page, name: str, docs: bool = False) -> None:
    """Save to test-artifacts/screenshots; with `docs`, also to docs/screenshots (README, docs/).

    Only pictures of the demo model go to docs/: the tiny random model's words are noise.
    """
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.mouse.move(0, 0)  # no hover highlight in the picture
    page.wait_for_timeout(300)  # let transitions settle
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if docs:
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS / path.name)


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def upload(page, selector: str, files) -> None:
    page.locator(f"{selector} input[type=file]").first.set_input_files(files)


def wait_idle(page, selector: str) -> None:
    """Wait until the component's Gradio status tracker is hidden (its event finished)."""
    page.wait_for_function(
        """(sel) => { const t = document.querySelector(sel + ' [data-testid="status-tracker"]');
                      return !t || t.classList.contains('hide'); }""",
        arg=selector,
    )


def ask_in_chat(page, questions) -> None:
    """Send each question from the chat's message box and wait until its answer has finished."""
    box = page.locator("#chat-message textarea")
    for turn, question in enumerate(questions, start=1):
        box.fill(question)
        box.press("Enter")
        page.locator('#chatbot [data-testid="bot"]').nth(turn - 1).wait_for()
        wait_idle(page, "#chatbot")


def set_slider(page, selector: str, value: str) -> None:
    """Type into a slider's number box until its range input shows the value.

    The accordion mounts its children as it opens; a value typed into the box
    during that mount can be dropped (seen once in CI), so type again until the
    slider itself reports it.
    """
    box = page.locator(f"{selector} input[type=number]")
    track = page.locator(f"{selector} input[type=range]")
    for _ in range(5):
        box.fill(value)
        box.press("Tab")
        try:
            sync_api.expect(track).to_have_value(value, timeout=2_000)
            return
        except AssertionError:
            continue
    sync_api.expect(track).to_have_value(value, timeout=TIMEOUT_MS)


def toast_text(page) -> str:
    toast = page.locator(".toast-body").first
    toast.wait_for()
    return toast.inner_text()


def write_caption(page, image: str) -> str:
    """Upload `image` on the Caption tab, press the button and return the caption it writes."""
    upload(page, "#caption-image", image)
    page.locator("#caption-image img").first.wait_for()
    page.locator("#caption-button").click()
    output = page.locator("#caption-output textarea")
    sync_api.expect(output).not_to_have_value("", timeout=TIMEOUT_MS)
    return output.input_value()


def check_model_tab(page, retrieval_model: str) -> None:
    open_tab(page, "Model")
    report = page.locator("#model-report")
    sync_api.expect(report).to_contain_text(retrieval_model)
    for expected in ("float32", "Vision encoder", "holds at most", "memory footprint"):
        assert expected in report.inner_text()


# --------------------------------------------------------------------------- tabs
def test_caption_tab(page):
    assert "\n" not in write_caption(page, CAT)
    output = page.locator("#caption-output textarea")

    page.get_by_text("Advanced settings").click()
    set_slider(page, "#caption-count", "3")
    first = output.input_value()
    page.locator("#caption-button").click()
    page.wait_for_function(
        "(first) => { const v = document.querySelector('#caption-output textarea').value;"
        " return v !== first && v.split('\\n').length === 3; }",
        arg=first,
    )
    screenshot(page, "tiny-caption")


def test_caption_example_click_shows_its_cached_caption(page):
    page.locator("#caption-examples button").first.click()
    output = page.locator("#caption-output textarea")
    sync_api.expect(output).not_to_have_value("", timeout=TIMEOUT_MS)
    cached = output.input_value()
    page.locator("#caption-image img").first.wait_for()  # the example also fills the image
    # The cached caption is the one the button writes with the default settings.
    page.locator("#caption-button").click()
    page.wait_for_function("() => document.querySelector('#caption-output textarea').value !== ''")
    sync_api.expect(output).to_have_value(cached, timeout=TIMEOUT_MS)


def test_caption_tab_reports_a_bad_file_clearly(page):
    upload(page, "#caption-image", str(HOSTILE / "made_random_bytes.jpg"))
    page.wait_for_timeout(500)
    page.locator("#caption-button").click()
    assert "not a recognised image" in toast_text(page)


def test_chat_tab_streams_two_turns(page):
    open_tab(page, "Chat")
    upload(page, "#chat-image", CAT)
    page.locator("#chat-image img").first.wait_for()
    # Record every text the latest answer bubble shows while it streams.
    page.evaluate(
        """() => {
            window.__answers = [];
            const box = document.querySelector('#chatbot');
            new MutationObserver(() => {
                const bots = box.querySelectorAll('[data-testid="bot"]');
                if (bots.length) window.__answers.push(bots[bots.length - 1].innerText);
            }).observe(box, {subtree: true, childList: true, characterData: true});
        }"""
    )
    box = page.locator("#chat-message textarea")
    for turn, question in enumerate(["What is in the picture?", "What colour is it?"], start=1):
        box.fill(question)
        box.press("Enter")
        sync_api.expect(box).to_have_value("")  # the box clears at once
        page.locator('#chatbot [data-testid="bot"]').nth(turn - 1).wait_for()
        wait_idle(page, "#chatbot")
        users = page.locator('#chatbot [data-testid="user"]')
        assert users.count() == turn and users.nth(turn - 1).inner_text().strip() == question
    final = page.locator('#chatbot [data-testid="bot"]').last.inner_text()
    seen = [t for t in page.evaluate("window.__answers") if t.strip()]
    assert final.strip()
    assert len(set(seen)) >= 3, f"expected the answer to arrive piece by piece, saw {len(set(seen))} states"
    screenshot(page, "tiny-chat")

    page.locator("#chat-clear").click()
    sync_api.expect(page.locator('#chatbot [data-testid="user"]')).to_have_count(0)


def index_three_photos(page):
    """The Retrieval tab with THREE indexed; returns the status box."""
    open_tab(page, "Retrieval")
    upload(page, "#gallery-files", THREE)
    page.wait_for_function("() => document.querySelectorAll('#gallery-files tbody tr').length === 3")
    page.locator("#index-button").click()
    status = page.locator("#gallery-status textarea")
    sync_api.expect(status).to_have_value(
        "Indexed 3 new images; the gallery now holds 3.", timeout=TIMEOUT_MS
    )
    return status


def test_retrieval_tab_index_and_search(page):
    index_three_photos(page)
    page.wait_for_function("() => document.querySelectorAll('#gallery-preview img').length === 3")

    page.locator("#search-query textarea").fill("a cat")
    page.locator("#search-button").click()
    page.wait_for_function("() => document.querySelectorAll('#search-results img').length === 3")
    assert "cosine" in page.locator("#search-results").inner_text()
    screenshot(page, "tiny-retrieval")

    page.get_by_role("tab", name="Search by image").click()
    upload(page, "#query-image", CAT)
    page.locator("#query-image img").first.wait_for()
    page.locator("#search-image-button").click()
    page.wait_for_function("() => document.querySelectorAll('#search-results img').length === 2")
    assert "skimage_chelsea" not in page.locator("#search-results").inner_text()


def test_model_tab(page):
    check_model_tab(page, "tiny-random-itm")
    screenshot(page, "tiny-model")


def test_phone_width(browser, app_url):
    context, page = open_page(browser, app_url, PHONE)
    try:
        write_caption(page, CAT)
        overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"the page is {overflow}px wider than a 390px phone"
        screenshot(page, "phone-caption")
        open_tab(page, "Chat")
        page.locator("#chat-message textarea").wait_for()
        screenshot(page, "phone-chat")
    finally:
        context.close()


# --------------------------------------------------------------------------- the demo model (docs/)
def test_demo_model_captions_its_own_picture(demo_page):
    caption = write_caption(demo_page, CIRCLE_CROSS_TRIANGLE)
    for named in ("yellow circle", "green cross", "red triangle"):
        assert named in caption, caption
    screenshot(demo_page, "caption", docs=True)


def test_demo_model_chat_answers_a_follow_up(demo_page):
    open_tab(demo_page, "Chat")
    upload(demo_page, "#chat-image", CIRCLE_CROSS_TRIANGLE)
    demo_page.locator("#chat-image img").first.wait_for()
    # Greedy decoding (the chat's default samples), so the answers can be checked.
    decoding = demo_page.locator("#tab-chat").get_by_role("button", name="Decoding")
    decoding.click()
    demo_page.locator("#tab-chat").get_by_label("Greedy").first.check()
    decoding.click()
    turns = [("what colour is the circle?", "yellow"), ("what shape is the red one?", "triangle")]
    ask_in_chat(demo_page, [question for question, _ in turns])
    answers = [a.strip() for a in demo_page.locator('#chatbot [data-testid="bot"]').all_inner_texts()]
    assert answers == [answer for _, answer in turns]
    screenshot(demo_page, "chat", docs=True)


def test_demo_model_finds_the_picture_a_text_describes(demo_page):
    open_tab(demo_page, "Retrieval")
    upload(demo_page, "#gallery-files", list(SHAPES.values()))
    rows = f"() => document.querySelectorAll('#gallery-files tbody tr').length === {len(SHAPES)}"
    demo_page.wait_for_function(rows)
    demo_page.locator("#index-button").click()
    status = demo_page.locator("#gallery-status textarea")
    sync_api.expect(status).to_have_value(
        f"Indexed {len(SHAPES)} new images; the gallery now holds {len(SHAPES)}.", timeout=TIMEOUT_MS
    )
    demo_page.locator("#search-query textarea").fill("a large blue circle in the middle")
    demo_page.locator("#search-button").click()
    demo_page.wait_for_function(
        f"() => document.querySelectorAll('#search-results img').length === {min(len(SHAPES), 6)}"
    )
    results = demo_page.locator("#search-results").inner_text()
    assert "#1 shapes_test_000006.png" in results, results  # the large blue circle in the middle
    screenshot(demo_page, "retrieval", docs=True)


def test_demo_model_tab(demo_page):
    check_model_tab(demo_page, "shapes-demo-itm")
    screenshot(demo_page, "model", docs=True)
