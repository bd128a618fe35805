"""The image slot of the Caption and Chat tabs: an "Upload" tab (the image input the public endpoints
read) and a "Draw" tab (a sketchpad), one image for both.

The endpoints keep their signature: `/caption`, `/chat`, `/answer`... take the image input only.
When the visitor is on the Draw tab, the button's first step (a private event, `use_drawing`)
decodes the drawing with the project's safe decoder (the same limits as an upload), flattens its
transparent canvas onto white and puts it into the image input; the model event that follows reads
the image input as always. So what is captioned is what the Upload tab then shows, and an API
caller who wants a drawing captioned sends it as an image.

The brushes are the six colours the bundled demo model knows, at a size that fills a shape in a
few strokes.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from ...engine import Engine
from ..components import SafeImage, SafeSketchpad, safe_image
from ..errors import guarded, user_error
from ..validation import one_drawing
from .common import IMAGE_SOURCES, UI_ONLY, UI_QUEUED

# The demo model's training colours (blip2_app/training/synthetic.py COLOURS), as brush colours.
BRUSH_COLOURS = {
    "red": "#d72323",
    "green": "#23a537",
    "blue": "#2346d7",
    "yellow": "#ebd723",
    "orange": "#f58719",
    "purple": "#872daf",
}
CANVAS = 320  # px, square: the column's width on a laptop; the model sees it resized anyway
BRUSH_RADIUS = 10  # px: a shape a third of the canvas wide fills in five or six strokes
SOURCES = ("upload", "draw")
DRAWING_PREFIX = "drawing-"


def drawing_file_name(content_hash: str) -> str:
    """The file a drawing is stored under: the same drawing, the same name (see `use_drawing`)."""
    return f"{DRAWING_PREFIX}{content_hash[:16]}.png"


class DrawingHandlers:
    """Puts the visitor's drawing into the image input (one instance per tab; holds the engine)."""

    def __init__(self, engine: Engine, cache_dir: str):
        self.engine = engine
        self.cache_dir = Path(cache_dir)

    @guarded("reading the drawing")
    def use_drawing(self, source: Any, drawing: Any, current: Any) -> Any:
        """On the Draw tab: the drawing as an image file for the image input (unchanged when it
        already holds this drawing, so a second question keeps the chat). On the Upload tab:
        nothing changes."""
        if source not in SOURCES:
            raise user_error(f"The image source must be one of {', '.join(SOURCES)}; got {source!r}.")
        if source == "upload":
            return gr.skip()
        prepared = one_drawing(self.engine, drawing)
        name = drawing_file_name(prepared.content_hash)
        if isinstance(current, str) and Path(current).name == name:
            return gr.skip()
        buffer = io.BytesIO()
        prepared.image.save(buffer, format="PNG")
        data = buffer.getvalue()
        # In Gradio's cache (cleaned by delete_cache) under a folder named by the bytes, as
        # Gradio names its own files, so the output is served without another copy.
        folder = self.cache_dir / hashlib.sha256(data).hexdigest()[:40]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        if not path.exists():
            path.write_bytes(data)
        return str(path)


@dataclass(frozen=True)
class ImageSlot:
    """The image input, the sketchpad, and which of the two tabs the visitor is on."""

    image: SafeImage
    drawing: SafeSketchpad
    source: gr.State
    handlers: DrawingHandlers

    def first_step(self) -> dict[str, Any]:
        """Keyword arguments of the event that runs before a model event reading `image`:
        `trigger(**slot.first_step()).success(model event)`."""
        return {
            "fn": self.handlers.use_drawing,
            "inputs": [self.source, self.drawing, self.image],
            "outputs": self.image,
            **UI_QUEUED,  # decoding costs CPU: in the queue, one at a time
        }


def image_slot(
    engine: Engine,
    prefix: str,
    label: str,
    height: int,
    state_ttl: float,
    examples: Callable[[SafeImage], None] | None = None,
) -> ImageSlot:
    """The Upload | Draw tab pair (inside a column); `examples` adds examples under the upload.
    `state_ttl`: seconds the session's choice of tab is kept, as every session state."""
    source = gr.State("upload", time_to_live=state_ttl)
    with gr.Tabs(elem_id=f"{prefix}-source"):
        with gr.Tab("Upload", id="upload", elem_id=f"{prefix}-upload-tab") as upload_tab:
            image = safe_image(label=label, sources=IMAGE_SOURCES, height=height, elem_id=f"{prefix}-image")
            if examples is not None:
                examples(image)
        with gr.Tab("Draw", id="draw", elem_id=f"{prefix}-draw-tab") as draw_tab:
            drawing = sketchpad(f"{prefix}-drawing")
            gr.Markdown(
                "Pick the brush (left) and a colour, draw with the mouse or a finger, then press the "
                "button as for an upload: the drawing (on white) becomes the image, and the Upload "
                "tab shows it.",
                elem_classes=["hint"],
            )
    upload_tab.select(lambda: "upload", None, source, **UI_ONLY)
    draw_tab.select(lambda: "draw", None, source, **UI_ONLY)
    return ImageSlot(image, drawing, source, DrawingHandlers(engine, image.GRADIO_CACHE))


def sketchpad(elem_id: str) -> SafeSketchpad:
    """The Draw tab's canvas: white, square, the six brush colours only, no layers or cropping."""
    colours: list[str | tuple[str, float]] = list(BRUSH_COLOURS.values())
    return SafeSketchpad(
        type="filepath",
        label="Drawing",
        sources=(),  # drawing only: uploads go through the Upload tab's safe input
        image_mode="RGBA",
        canvas_size=(CANVAS, CANVAS),
        fixed_canvas=True,
        brush=gr.Brush(
            colors=colours, default_color=colours[0], color_mode="fixed", default_size=BRUSH_RADIUS
        ),
        layers=False,
        transforms=(),
        format="png",
        elem_id=elem_id,
    )
