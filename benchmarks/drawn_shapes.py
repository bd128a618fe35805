"""What a model reads from shapes drawn the way a visitor fills them on the Draw tab (issue 19):
one colour, round brush strokes side by side, no outline, on the white 320 px canvas.

    python benchmarks/drawn_shapes.py                       # shapes-demo, about 3 minutes
    python benchmarks/drawn_shapes.py --model tiny-random --limit 4 --out /tmp/x

Four shapes x the six brush colours x five sizes and places; for each drawing the short caption,
"what shape is it?" and "what colour is the shape?" (the app's default decoding). A caption counts
as right when the first object it names has the drawing's colour (and shape). Per-shape rates go
to benchmarks/results/drawn_shapes.{json,md}; tests/test_browser_drawing.py's SHAPES_READ lists
the shapes whose caption is right reliably (tighten it from here when a new model ships).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blip2_app.config import Settings  # noqa: E402
from blip2_app.startup import load_engine  # noqa: E402
from blip2_app.ui.tabs.drawing import BRUSH_COLOURS, BRUSH_RADIUS, CANVAS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHAPES = ("circle", "square", "triangle", "cross")
# (half size, centre x) in canvas px: large in the middle, medium left / middle / right, small.
PLACES = ((120, 160), (90, 90), (90, 160), (90, 230), (60, 160))


def _span(shape: str, dy: float, half: float) -> float:
    """Half the width of the stroke at `dy` from the centre (the brush's round ends excluded)."""
    r = BRUSH_RADIUS
    if shape == "circle":
        return math.sqrt(max(half**2 - dy**2, 0.0)) - 0.8 * r
    if shape == "square":
        return half - r
    if shape == "triangle":  # apex up
        return (dy + half) / (2 * half) * half - 0.6 * r
    if shape == "cross":
        arm = 0.35 * half
        return half - r if abs(dy) <= arm else arm - r
    raise ValueError(shape)


def draw(shape: str, colour: str, half: float, centre_x: float) -> Image.Image:
    """Horizontal strokes of the brush filling `shape`, as the browser test draws them."""
    image = Image.new("RGB", (CANVAS, CANVAS), "white")
    pen = ImageDraw.Draw(image)
    fill, r, centre_y = BRUSH_COLOURS[colour], BRUSH_RADIUS, CANVAS / 2
    dy = -half + r
    while dy <= half - r + 0.1:
        width = _span(shape, dy, half)
        if width > 0:
            ends = [(centre_x - width, centre_y + dy), (centre_x + width, centre_y + dy)]
            pen.line(ends, fill=fill, width=2 * r)
            for x, y in ends:
                pen.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        dy += 1.5 * r
    return image


def first_object(caption: str) -> str:
    return caption.split(" and ")[0].split(",")[0]


def measure(engine, limit: int | None = None) -> list[dict]:
    rows = []
    grid = itertools.product(SHAPES, BRUSH_COLOURS, PLACES)
    for shape, colour, (half, centre_x) in itertools.islice(grid, limit):
        image = draw(shape, colour, half, centre_x)
        caption = engine.caption(image)[0][0].text
        first = first_object(caption)
        rows.append(
            {
                "shape": shape,
                "colour": colour,
                "half": half,
                "centre_x": centre_x,
                "caption": caption,
                "shape_answer": engine.answer(image, "what shape is it?").text,
                "colour_answer": engine.answer(image, "what colour is the shape?").text,
                "caption_colour": colour in first,
                "caption_shape": f"{colour} {shape}" in first,
            }
        )
    return rows


def summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    by_shape: dict[str, dict[str, float]] = {}
    for shape in SHAPES:
        mine = [r for r in rows if r["shape"] == shape]
        if mine:
            by_shape[shape] = {
                "drawings": len(mine),
                "caption_colour": sum(r["caption_colour"] for r in mine) / len(mine),
                "caption_shape": sum(r["caption_shape"] for r in mine) / len(mine),
                "vqa_colour": sum(r["colour_answer"] == r["colour"] for r in mine) / len(mine),
                "vqa_shape": sum(r["shape_answer"] == r["shape"] for r in mine) / len(mine),
            }
    return by_shape


def markdown(model: str, by_shape: dict[str, dict[str, float]]) -> str:
    lines = [
        f"# Drawn shapes read by {model}",
        "",
        "Filled shapes drawn as on the Draw tab (one brush colour, round strokes, no outline, white "
        f"{CANVAS} px canvas), six colours x five sizes and places per shape "
        "(`benchmarks/drawn_shapes.py`). Caption: the first object it names has the colour "
        "(and the shape).",
        "",
        "| shape | drawings | caption colour | caption colour + shape | VQA colour | VQA shape |",
        "|---|---|---|---|---|---|",
    ]
    for shape, s in by_shape.items():
        lines.append(
            f"| {shape} | {s['drawings']:.0f} | {s['caption_colour']:.2f} | {s['caption_shape']:.2f} "
            f"| {s['vqa_colour']:.2f} | {s['vqa_shape']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes-demo", help="registry name or checkpoint folder")
    parser.add_argument("--limit", type=int, default=None, help="only the first N drawings")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for drawn_shapes.{json,md}")
    args = parser.parse_args(argv)
    engine = load_engine(Settings(model=args.model))
    rows = measure(engine, args.limit)
    by_shape = summary(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "by_shape": by_shape, "drawings": rows}
    (args.out / "drawn_shapes.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "drawn_shapes.md").write_text(markdown(args.model, by_shape))
    print(markdown(args.model, by_shape))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
