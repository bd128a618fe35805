"""The training renderer of "random" scenes: domain randomisation over how a shape can be drawn.

Everything the name of an object does not fix is drawn at random, from a generator seeded by the
scene, so an image is a pure function of its scene: the render size (64-512 px, log-uniform; the
app's processor then resizes it, as it resizes any upload), fill colours around each colour name
(hue, saturation and lightness, inside ranges that stay unambiguous for the name), an outline or
none (varied width and colour), aliased or anti-aliased edges (supersampled), backgrounds (the
classic tinted gradient, flat white and greys, stripes, checks, blotches, paper grain), mild
photographic noise and JPEG compression. Geometry (size, place, rotation, proportions) is the
scene's own (`synthetic.outline_points`), so the patch labels drawn from it match the pixels.
"""

from __future__ import annotations

import colorsys
import io
import math

import numpy as np
from PIL import Image, ImageDraw

from .synthetic import COLOURS, IMAGE_SIZE, Scene, outline_points

RENDER_SIZES = (64, 512)
# Hue (degrees), saturation and lightness (HLS) ranges per colour name. Neighbouring names keep a
# gap in hue (red ... 8 | 20 ... orange ... 40 | 47 ... yellow ... 63 | 90 ... green ... 150 |
# 200 ... blue ... 245 | 262 ... purple ... 305), and lightness stays away from white and black.
COLOUR_RANGES: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "red": ((-8.0, 8.0), (0.55, 1.0), (0.32, 0.58)),
    "orange": ((20.0, 40.0), (0.7, 1.0), (0.45, 0.6)),
    "yellow": ((47.0, 63.0), (0.7, 1.0), (0.42, 0.6)),
    "green": ((90.0, 150.0), (0.45, 1.0), (0.22, 0.55)),
    "blue": ((200.0, 245.0), (0.5, 1.0), (0.3, 0.62)),
    "purple": ((262.0, 305.0), (0.35, 1.0), (0.22, 0.5)),
}
# The plain colours of a paint program's first palette row, one per name: drawn as they are now
# and then, beside the classic values.
PLAIN_COLOURS = {
    "red": (255, 0, 0),
    "orange": (255, 128, 0),
    "yellow": (255, 255, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "purple": (128, 0, 160),
}
BACKGROUNDS = ("gradient", "flat", "white", "stripes", "checks", "blotches", "grain")
# Every fill is darker on average (over R, G, B) than every background: the sign of a shape's
# edge then never depends on its colour, which is what a ViT's linear patch embedding learns
# shapes from (the classic generator's dark outline did the same; with neither, shape accuracy
# after 1,400 pretraining steps was 0.46 against 1.00 for colour). Paint programs draw so:
# saturated colours on a white or light canvas.
FILL_MEAN_MAX = 178.0
BACKGROUND_MIN = 188.0


def fill_colour(rng: np.random.Generator, name: str) -> tuple[int, int, int]:
    pick = rng.random()
    if pick < 0.1:
        return COLOURS[name]
    if pick < 0.2:
        return PLAIN_COLOURS[name]
    (h0, h1), (s0, s1), (l0, l1) = COLOUR_RANGES[name]
    while True:  # a few draws at most: most of each range is dark enough
        hue = (rng.uniform(h0, h1) % 360.0) / 360.0
        rgb = colorsys.hls_to_rgb(hue, rng.uniform(l0, l1), rng.uniform(s0, s1))
        red, green, blue = (round(255 * c) for c in rgb)
        if (red + green + blue) / 3 <= FILL_MEAN_MAX:
            return (red, green, blue)


def _outline(rng: np.random.Generator, fill: tuple[int, int, int]) -> tuple[int, int, int]:
    pick = rng.random()
    if pick < 0.6:
        grey = int(rng.integers(0, 70))
        return (grey, grey, grey)
    if pick < 0.9:  # a darker shade of the fill
        shade = rng.uniform(0.3, 0.6)
        red, green, blue = (int(c * shade) for c in fill)
        return (red, green, blue)
    grey = int(rng.integers(225, 256))
    return (grey, grey, grey)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32: light and of low saturation, so it never reads as a shape colour."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    base = float(rng.uniform(BACKGROUND_MIN + 20, 245))  # room for texture and tint below it
    tint = rng.uniform(-8, 8, size=3).astype(np.float32)
    if kind == "white":
        return np.full((size, size, 3), rng.uniform(242, 255), dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    if kind == "gradient":
        top, bottom = base + tint, float(rng.uniform(BACKGROUND_MIN + 10, 250)) + rng.uniform(-8, 8, size=3)
        grid = ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None]
        return np.broadcast_to(top + (bottom - top) * grid, (size, size, 3)).astype(np.float32)
    plain: np.ndarray
    if kind == "flat":
        plain = np.full((size, size), base, dtype=np.float32)
    elif kind in ("stripes", "checks"):
        period = float(rng.uniform(6, 16)) / IMAGE_SIZE  # in image widths
        turn = float(rng.uniform(0, math.pi))
        y, x = np.meshgrid(ramp, ramp, indexing="ij")
        u = (x * math.cos(turn) + y * math.sin(turn)) / period
        wave = np.sin(2 * np.pi * u)
        if kind == "checks":
            v = (-x * math.sin(turn) + y * math.cos(turn)) / period
            wave = np.sign(wave * np.sin(2 * np.pi * v))
        plain = base + float(rng.uniform(3, 10)) * wave
    elif kind == "blotches":
        cells = int(rng.integers(3, 9))
        coarse = Image.fromarray(rng.uniform(-1, 1, size=(cells, cells)).astype(np.float32), mode="F")
        plain = base + float(rng.uniform(4, 10)) * np.asarray(
            coarse.resize((size, size), Image.Resampling.BICUBIC)
        )
    else:  # paper grain: fine noise, softened
        grain = Image.fromarray(rng.normal(0, 1, size=(size // 2 + 1,) * 2).astype(np.float32), mode="F")
        plain = base + float(rng.uniform(2, 6)) * np.asarray(
            grain.resize((size, size), Image.Resampling.BILINEAR)
        )
    return np.maximum(np.asarray(plain, dtype=np.float32)[..., None] + tint, BACKGROUND_MIN).astype(
        np.float32
    )


def render(scene: Scene) -> Image.Image:
    rng = np.random.default_rng([scene.noise_seed, 7])
    low, high = RENDER_SIZES
    size = round(math.exp(rng.uniform(math.log(low), math.log(high))))
    pixels = background(rng, size)
    # Anti-aliased: drawn at 2-4 times the size and box-filtered down; else drawn as it falls.
    factor = int(rng.integers(2, 5)) if rng.random() < 0.5 else 1
    factor = max(1, min(factor, 1024 // size))
    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if factor > 1:
        canvas = canvas.resize((size * factor, size * factor), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    scale = size * factor / IMAGE_SIZE
    for obj in scene.objects:
        fill = fill_colour(rng, obj.colour)
        points = outline_points(obj, scale, -0.5)
        if rng.random() < 0.5:
            width = max(1, round(rng.uniform(0.5, 2.5) * scale))
            draw.polygon(points, fill=fill, outline=_outline(rng, fill), width=width)
        else:
            draw.polygon(points, fill=fill)
    if factor > 1:
        canvas = canvas.reduce(factor)
    if rng.random() < 0.5:
        noisy = np.asarray(canvas, dtype=np.float32) + rng.normal(
            0.0, rng.uniform(1, 7), size=(size, size, 1)
        )
        canvas = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    if rng.random() < 0.4:
        buffer = io.BytesIO()
        canvas.save(buffer, format="JPEG", quality=int(rng.integers(30, 96)))
        canvas = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return canvas
