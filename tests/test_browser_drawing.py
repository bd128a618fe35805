"""Drawing instead of uploading, in a real browser (Debian chromium, headless), with the set-up of
test_browser.py, on the bundled demo model: fill a shape with mouse strokes in one colour on the
Caption tab's Draw tab, caption it and read the colour (and, for the shapes the shipped model
reads reliably, the shape) back; ask about a drawing on the Chat tab; the demo model's own example
pictures replace the photos. The Caption screenshot goes to docs/screenshots/caption-drawing.png.

What the shipped demo model gets right on filled shapes drawn without an outline (issue 19,
benchmarks/drawn_shapes.py: 120 drawings, six colours, five sizes and places): the colour every
time; in the caption, the shape for squares always, circles 0.77, crosses 0.57, triangles 0.43. So
every drawing's colour is checked, its shape only where listed in SHAPES_READ; when a retrained
model reads more shapes (rerun the benchmark), add them there.
"""

from __future__ import annotations

import math

import pytest
from test_browser import (  # the shared set-up (skips this module too when chromium is missing)
    ask_in_chat,
    browser,  # noqa: F401  # fixture, used by demo_page
    demo_page,  # noqa: F401  # fixture, requested by name below
    demo_url,  # noqa: F401  # fixture, used by demo_page
    open_tab,
    screenshot,
    wait_idle,
)

from blip2_app.registry import Registry
from blip2_app.ui.tabs.drawing import BRUSH_COLOURS

pytestmark = pytest.mark.browser

SHAPES_READ = {"square"}  # shapes the shipped demo model names right when drawn by hand
HALF = 85  # screen px from the shape's centre to its edge (the canvas shows about 290 px)
STEP = 12  # screen px between strokes: the brush is about 18 px wide, so strokes overlap


def _rgb(colour: str) -> str:
    hex_value = BRUSH_COLOURS[colour].lstrip("#")
    red, green, blue = (int(hex_value[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgb({red}, {green}, {blue})"


def _span(shape: str, dy: float) -> float:
    """Half the width of `shape` at height `dy` below its centre (screen px), minus the brush."""
    if shape == "circle":
        return math.sqrt(max(HALF**2 - dy**2, 0.0)) - 8
    if shape == "square":
        return HALF - 8
    if shape == "triangle":  # apex up: no width at the top, the whole base at the bottom
        return (dy + HALF) / 2 - 6
    raise ValueError(shape)


def draw_filled(page, prefix: str, shape: str, colour: str) -> None:
    """On `prefix`'s Draw tab: pick the brush and `colour`, fill `shape` with horizontal strokes."""
    page.locator(f"#{prefix}-source").get_by_role("tab", name="Draw").click()
    pad = page.locator(f"#{prefix}-drawing")
    pad.get_by_role("button", name="Brush", exact=True).click()
    pad.get_by_role("button", name="Color", exact=True).click()
    pad.locator(f"button[style*='background-color: {_rgb(colour)}']").click()
    pad.get_by_role("button", name="Color", exact=True).click()  # close the palette
    box = pad.locator("canvas").last.bounding_box()
    centre_x, centre_y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    dy = -HALF + 8
    while dy <= HALF - 8:
        half_width = _span(shape, dy)
        if half_width > 0:
            page.mouse.move(centre_x - half_width, centre_y + dy)
            page.mouse.down()
            # The canvas draws on animation frames: move in small steps, with a pause between.
            for step in range(1, 11):
                page.mouse.move(centre_x - half_width + 2 * half_width * step / 10, centre_y + dy, steps=2)
                page.wait_for_timeout(16)
            page.mouse.up()
            page.wait_for_timeout(30)
        dy += STEP


def caption_drawing(page, shape: str, colour: str) -> str:
    draw_filled(page, "caption", shape, colour)
    output = page.locator("#caption-output textarea")
    before = output.input_value()
    page.locator("#caption-button").click()
    page.wait_for_function(
        "(before) => { const v = document.querySelector('#caption-output textarea').value;"
        " return v !== '' && v !== before; }",
        arg=before,
    )
    wait_idle(page, "#caption-output")
    return output.input_value()


@pytest.mark.parametrize(("shape", "colour"), [("circle", "blue"), ("square", "green"), ("triangle", "red")])
def test_a_drawn_shape_is_captioned_with_its_colour(demo_page, shape, colour):  # noqa: F811  # fixture imported above
    page = demo_page
    caption = caption_drawing(page, shape, colour)
    print(f"drawn {colour} {shape}: {caption!r}")  # the measured reading, for the record
    first = caption.split(" and ")[0].split(",")[0]  # the first object the caption names
    assert colour in first, caption
    if shape in SHAPES_READ:
        assert f"{colour} {shape}" in first, caption
    if shape == "circle":
        screenshot(page, "caption-drawing", docs=True)
    # What was captioned is what the Upload tab now shows: the drawing, on white.
    page.locator("#caption-source").get_by_role("tab", name="Upload").click()
    src = page.locator("#caption-image img").first.get_attribute("src")
    assert src and "drawing-" in src


def test_an_empty_drawing_is_refused_with_a_sentence(demo_page):  # noqa: F811  # fixture imported above
    page = demo_page
    page.locator("#caption-source").get_by_role("tab", name="Draw").click()
    page.locator("#caption-button").click()
    toast = page.locator(".toast-body").first
    toast.wait_for()
    assert "The drawing is empty" in toast.inner_text()
    assert page.locator("#caption-output textarea").input_value() == ""


def test_chat_about_a_drawing_keeps_the_conversation(demo_page):  # noqa: F811  # fixture imported above
    page = demo_page
    open_tab(page, "Chat")
    # Greedy decoding: the chat samples by default, and a test of what the model reads must not.
    chat = page.locator("#tab-chat")
    chat.get_by_role("button", name="Decoding").first.click()
    chat.get_by_label("Greedy").first.check()
    draw_filled(page, "chat", "circle", "orange")
    ask_in_chat(page, ["what colour is the shape?", "what shape is it?"])
    answers = page.locator('#chatbot [data-testid="bot"]')
    # The second question about the same drawing continues the chat (two turns shown).
    assert answers.count() == 2
    assert "orange" in answers.nth(0).inner_text()
    assert "circle" in answers.nth(1).inner_text()


def test_the_demo_model_offers_its_own_pictures_with_questions(demo_page):  # noqa: F811  # fixture imported above
    examples = Registry.load().resolve("shapes-demo").examples
    page = demo_page
    gallery = page.locator("#caption-examples")
    assert "Example pictures for shapes-demo" in gallery.inner_text()
    assert gallery.locator("img").count() == len(examples)
    # Cached lazily (--cache-examples lazy, as on a Space) like the photos: the first picture is a
    # red triangle, and the colour is what every demo model so far reads right.
    gallery.locator("button").first.click()
    output = page.locator("#caption-output textarea")
    page.wait_for_function("() => document.querySelector('#caption-output textarea').value !== ''")
    assert "red" in output.input_value()
    open_tab(page, "Chat")
    page.locator("#chat-examples tbody tr").first.click()  # a table: picture and question
    # An example puts its picture in the image input and its question in the message box.
    page.locator("#chat-image img").first.wait_for()
    assert page.locator("#chat-message textarea").input_value() == examples[0].question
