"""The Draw tab of the Caption and Chat tabs without a browser: the sketchpad hands over only its
uploaded composite (checked like an upload, never decoded by Gradio), the drawing is decoded by the
safe decoder with the upload's limits and flattened onto white, an empty canvas is refused with a
sentence, the same drawing keeps its file (so a chat goes on), and the examples follow the model."""

from __future__ import annotations

import functools
import types
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from gradio.components.image_editor import EditorData
from gradio.data_classes import FileData
from PIL import Image

from blip2_app.engine import Engine
from blip2_app.images import ImageLimits
from blip2_app.registry import Example
from blip2_app.training.synthetic import COLOURS
from blip2_app.ui.components import SafeSketchpad
from blip2_app.ui.tabs.caption import CaptionHandlers
from blip2_app.ui.tabs.drawing import BRUSH_COLOURS, DrawingHandlers, drawing_file_name
from blip2_app.ui.tabs.examples import PHOTOS_LABEL, examples_for
from blip2_app.ui.validation import EMPTY_DRAWING, one_drawing

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ROOT / "tests" / "data" / "hostile"
RED = (215, 35, 35)


@pytest.fixture(scope="module")
def engine(load_tiny):
    return load_tiny("tiny-random")


def canvas(tmp_path: Path, drawn: bool = True, name: str = "composite.png") -> str:
    """What the browser uploads: a transparent RGBA canvas with (or without) a red square."""
    pixels = np.zeros((120, 120, 4), dtype=np.uint8)  # RGB 0 under alpha 0, as the canvas exports
    if drawn:
        pixels[30:90, 30:90] = (*RED, 255)
    path = tmp_path / name
    Image.fromarray(pixels, "RGBA").save(path)
    return str(path)


def test_brushes_are_the_colours_the_demo_model_learnt():
    as_rgb = {
        name: tuple(int(value[i : i + 2], 16) for i in (1, 3, 5)) for name, value in BRUSH_COLOURS.items()
    }
    assert as_rgb == COLOURS


def test_a_drawing_is_flattened_onto_white(engine, tmp_path):
    prepared = one_drawing(engine, canvas(tmp_path))
    pixels = np.asarray(prepared.image)
    assert prepared.image.mode == "RGB"
    assert tuple(pixels[0, 0]) == (255, 255, 255)  # the transparent canvas, not black
    assert tuple(pixels[60, 60]) == RED


@pytest.mark.parametrize("value", [None, "", "   "])
def test_nothing_drawn_is_refused_with_a_sentence(engine, value):
    with pytest.raises(gr.Error) as excinfo:
        one_drawing(engine, value)
    assert excinfo.value.message == EMPTY_DRAWING


def test_an_empty_canvas_is_refused_with_a_sentence(engine, tmp_path):
    with pytest.raises(gr.Error) as excinfo:
        one_drawing(engine, canvas(tmp_path, drawn=False))
    assert excinfo.value.message == EMPTY_DRAWING


def test_a_drawing_meets_the_upload_limits(engine, tmp_path):
    """A drawing sent by an API caller goes through the same decoder and limits as an upload."""
    with pytest.raises(ValueError, match="pixels"):
        one_drawing(engine, str(HOSTILE / "made_png_header_claims_100000x100000.png"))
    small = types.SimpleNamespace(image_limits=ImageLimits(max_pixels=100 * 100))
    small.prepare = functools.partial(Engine.prepare, small)  # the engine's decoding, smaller limits
    with pytest.raises(ValueError, match="pixels"):
        one_drawing(small, canvas(tmp_path))  # 120 x 120 > 100 x 100
    with pytest.raises(ValueError, match="not a recognised image"):
        one_drawing(engine, str(HOSTILE / "made_random_bytes.jpg"))


def test_use_drawing_fills_the_image_input_only_from_the_draw_tab(engine, tmp_path):
    handlers = DrawingHandlers(engine, str(tmp_path / "cache"))
    drawing = canvas(tmp_path)
    assert handlers.use_drawing("upload", drawing, "photo.jpg") == gr.skip()
    path = handlers.use_drawing("draw", drawing, "photo.jpg")
    expected = drawing_file_name(one_drawing(engine, drawing).content_hash)
    assert Path(path).name == expected and Path(path).is_relative_to(tmp_path / "cache")
    with Image.open(path) as saved:
        assert saved.mode == "RGB" and saved.getpixel((0, 0)) == (255, 255, 255)
    # The same drawing again (a second chat question): the image input keeps its file, so its
    # change event does not start the conversation over.
    again = canvas(tmp_path, name="again.png")
    assert handlers.use_drawing("draw", again, path) == gr.skip()
    with pytest.raises(gr.Error, match="image source must be one of upload, draw"):
        handlers.use_drawing("camera", drawing, None)
    with pytest.raises(gr.Error, match="The drawing is empty"):
        handlers.use_drawing("draw", canvas(tmp_path, drawn=False, name="blank.png"), path)


def test_a_drawing_is_captioned_like_an_upload(engine, tmp_path):
    handlers = DrawingHandlers(engine, str(tmp_path / "cache"))
    path = handlers.use_drawing("draw", canvas(tmp_path), None)
    captions = CaptionHandlers(engine)
    assert captions.caption(path, "short", "", "greedy", max_new_tokens=5) == captions.caption(
        Image.open(path), "short", "", "greedy", max_new_tokens=5
    )


def test_the_sketchpad_hands_over_the_composite_path_only(tmp_path):
    pad = SafeSketchpad(type="filepath")
    composite = canvas(tmp_path)
    payload = EditorData(
        background=FileData(path=str(HOSTILE / "made_random_bytes.jpg")),  # never opened
        layers=[FileData(path=str(HOSTILE / "made_random_bytes.jpg"))],
        composite=FileData(path=composite),
    )
    assert pad.preprocess(payload) == composite
    assert pad.preprocess(None) is None
    assert pad.preprocess(EditorData(id="blobs-by-id")) is None  # this component keeps no blobs
    with pytest.raises(gr.Error, match="not fetched"):
        pad.preprocess(EditorData(composite=FileData(path="https://example.com/a.png")))
    with pytest.raises(gr.Error, match="not fetched"):
        pad.preprocess(EditorData(composite=FileData(path="", url="https://example.com/a.png")))
    # Gradio's ImageEditor stores any caller's bytes under any id through this server function.
    assert pad.server_fns == []


def _context(examples, photos):
    captioner = types.SimpleNamespace(name="my-model", examples=examples)
    return types.SimpleNamespace(models=types.SimpleNamespace(captioner=captioner), examples=photos)


def test_examples_follow_the_model(tmp_path):
    picture = tmp_path / "shape.png"
    Image.new("RGB", (8, 8), "red").save(picture)
    own = examples_for(_context((Example(str(picture), "what colour is it?"),), ["cat.jpg"]))
    assert (own.images, own.questions, own.has_questions) == ((str(picture),), ("what colour is it?",), True)
    assert "my-model" in own.label
    photos = examples_for(_context((), ["cat.jpg", "astronaut.jpg"]))
    assert (photos.images, photos.label, photos.has_questions) == (
        ("cat.jpg", "astronaut.jpg"),
        PHOTOS_LABEL,
        False,
    )


def test_the_drawn_shapes_benchmark_runs_on_the_tiny_model(tmp_path):
    """benchmarks/drawn_shapes.py (its shapes-demo results are committed): the drawings are one
    brush colour on white, and the result files hold one row per drawing and per-shape rates."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("drawn_shapes", ROOT / "benchmarks" / "drawn_shapes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    drawing = np.asarray(bench.draw("triangle", "blue", 90, 160))
    colours = {tuple(p) for p in drawing.reshape(-1, 3)}
    assert colours <= {(255, 255, 255), COLOURS["blue"]} and len(colours) == 2  # aliased strokes
    # apex up: the top row of the triangle is narrower than its bottom row
    rows = np.flatnonzero((drawing != 255).any(axis=(1, 2)))
    width = [(drawing[row] != 255).any(axis=1).sum() for row in (rows[0], rows[-1])]
    assert width[0] < width[1]
    assert bench.main(["--model", "tiny-random", "--limit", "3", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "drawn_shapes.json").read_text())
    assert [row["shape"] for row in result["drawings"]] == ["circle"] * 3
    assert result["by_shape"]["circle"]["drawings"] == 3
    assert "| circle | 3 |" in (tmp_path / "drawn_shapes.md").read_text()
