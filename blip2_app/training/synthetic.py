"""Seeded synthetic "shapes" data: small images of one to three coloured shapes, with captions,
VQA pairs (colour, shape, count, position, size, yes/no) and retrieval queries.

Three styles of scene (`STYLES`), one renderer each:
- "classic": the first generator, kept bit for bit (its test split is the old benchmark): six
  exact colours, a dark outline, two diameters, three fixed slots, 64 px.
- "random": domain randomisation, what the demo model trains on (`randomised.py`): continuous
  sizes and places, rotation, colours jittered around each name, outlines present or not,
  aliased or anti-aliased, 64-512 px, JPEG, textured and noisy backgrounds.
- "paint": the same kind of scene drawn by an independent renderer (`paint.py`, numpy signed
  distances, a paint program's palette) that training never sees: the held-out evaluation.

The data is built so that every question is answerable from the pixels alone: each object sits in
one of three horizontal slots (left, middle, right), colours and shapes are distinct within an
image (so "the circle" and "the red shape" each name one object, and captions never repeat a
word trigram, which the app's default `no_repeat_ngram_size=3` would forbid), sizes are clearly
small or large, and backgrounds are low-saturation so no background reads as a shape colour.

Everything is a pure function of (seed, split, index): one `numpy` generator per image, so a
split is reproducible in any order and in any process, and the splits never share a generator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 70, 215),
    "yellow": (235, 215, 35),
    "purple": (135, 45, 175),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "cross")
OUTLINE = (25, 25, 25)
SIZES = ("small", "large")
POSITIONS = ("left", "middle", "right")
POSITION_PHRASES = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
# Diameter in pixels at IMAGE_SIZE=64: far enough apart that size is never ambiguous.
DIAMETERS = {"small": (13, 14), "large": (19, 21)}
SPLITS = ("train", "val", "test")
STYLES = ("classic", "random", "paint")
# Continuous geometry ("random" and "paint" scenes), in the 64-unit design space every renderer
# scales: diameters of small and large shapes leave a gap (15 -> 19) so size is never ambiguous;
# a lone shape may be drawn larger, as people draw one shape.
CONTINUOUS_DIAMETERS = {"small": (11.0, 15.0), "large": (19.0, 26.0)}
# The largest large shape by the number of shapes: three must fit side by side.
LARGE_MAX = {1: 34.0, 2: 26.0, 3: 22.0}
# Neighbours' bounding boxes may overlap by this much (a triangle's box is mostly empty).
BOX_OVERLAP = 3.0
# A shape's centre stays this far inside its third of the width: its place is never ambiguous.
POSITION_MARGIN = 3.0
TRIANGLE_FORMS = ("equilateral", "isosceles", "right")
# How often an image holds 1, 2 or 3 objects.
OBJECT_COUNT_WEIGHTS = (0.3, 0.35, 0.35)


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    size: str
    position: str
    centre: tuple[float, float]  # in the 64-unit design space
    diameter: float
    # Continuous scenes only: rotation in degrees, proportions (ellipse / rectangle aspect, a
    # triangle's height over width, a cross's arm half-width over its radius) and a triangle's form.
    angle: float = 0.0
    aspect: float = 1.0
    form: str = ""

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    @property
    def short_phrase(self) -> str:
        return f"{article(self.colour)} {self.colour} {self.shape}"

    def box_contains(self, x: float, y: float) -> bool:
        """(x, y), in the 64-unit design space, lies in the object's bounding box."""
        half = self.diameter / 2
        return abs(x - self.centre[0]) <= half and abs(y - self.centre[1]) <= half


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str  # colour, shape, count, position, size, yes/no


@dataclass(frozen=True)
class Scene:
    """One synthetic image and everything said about it."""

    image_id: str
    objects: tuple[ShapeObject, ...]  # left to right
    background: tuple[tuple[int, int, int], tuple[int, int, int]]  # top and bottom colours
    noise_seed: int
    captions: tuple[str, ...]  # captions[0] is the canonical one the model is trained on
    qa: tuple[QA, ...] = field(default_factory=tuple)
    style: str = "classic"

    @property
    def caption(self) -> str:
        return self.captions[0]

    @property
    def query(self) -> str:
        """The retrieval query: the canonical caption names every attribute, so it picks one image."""
        return self.captions[0]

    def render(self) -> Image.Image:
        return render(self)


def _split_stream(split: str) -> int:
    return SPLITS.index(split) + 1


def scene_rng(seed: int, split: str, index: int, style: str = "classic") -> np.random.Generator:
    """Classic scenes keep their original streams; the others get one stream per style, so the
    held-out "paint" split shares no scene with the "random" one."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}; got {style!r}")
    if style == "classic":
        return np.random.default_rng([seed, _split_stream(split), index])
    return np.random.default_rng([seed, _split_stream(split), index, STYLES.index(style)])


def single_shape_gallery(folder: Path, seed: int, count: int) -> list[tuple[str, str, str]]:
    """`count` held-out single-shape test scenes of `seed` saved as `NNN-<colour>-<shape>.png` in
    `folder` (a search result's name tells its kind): (path, colour, shape) of each."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for index in range(count):
        scene = make_scene(seed, "test", index, count=1)
        shape = scene.objects[0]
        path = folder / f"{index:03d}-{shape.colour}-{shape.shape}.png"
        scene.render().save(path)
        out.append((str(path), shape.colour, shape.shape))
    return out


def make_scene(seed: int, split: str, index: int, count: int | None = None, style: str = "classic") -> Scene:
    """The `index`-th scene of `split` for `seed` and `style` (or with exactly `count` objects)."""
    rng = scene_rng(seed, split, index, style)
    if style != "classic":
        return _continuous_scene(rng, f"shapes-{style}-{seed}-{split}-{index:06d}", style, count)
    if count is None:
        count = int(rng.choice([1, 2, 3], p=OBJECT_COUNT_WEIGHTS))
    positions = sorted(rng.choice(len(POSITIONS), size=count, replace=False).tolist())
    colours = rng.choice(list(COLOURS), size=count, replace=False).tolist()
    shapes = rng.choice(SHAPES, size=count, replace=False).tolist()
    objects: list[ShapeObject] = []
    slot = IMAGE_SIZE / len(POSITIONS)
    for slot_index, colour, shape in zip(positions, colours, shapes, strict=True):
        size = SIZES[int(rng.integers(2))]
        diameter = int(rng.integers(DIAMETERS[size][0], DIAMETERS[size][1] + 1))
        x = round(slot * (slot_index + 0.5) + rng.integers(-2, 3))
        margin = diameter // 2 + 2
        y = int(rng.integers(margin, IMAGE_SIZE - margin))
        objects.append(ShapeObject(colour, shape, size, POSITIONS[slot_index], (x, y), diameter))
    background = (_background_colour(rng), _background_colour(rng))
    noise_seed = int(rng.integers(2**31))
    placed = tuple(objects)
    return Scene(
        image_id=f"shapes-{seed}-{split}-{index:06d}",
        objects=placed,
        background=background,
        noise_seed=noise_seed,
        captions=captions_for(placed),
        qa=tuple(questions_for(placed, rng)),
    )


def _continuous_scene(rng: np.random.Generator, image_id: str, style: str, count: int | None) -> Scene:
    if count is None:
        count = int(rng.choice([1, 2, 3], p=OBJECT_COUNT_WEIGHTS))
    slots = sorted(rng.choice(len(POSITIONS), size=count, replace=False).tolist())
    colours = rng.choice(list(COLOURS), size=count, replace=False).tolist()
    shapes = rng.choice(SHAPES, size=count, replace=False).tolist()
    sizes = [SIZES[int(rng.integers(2))] for _ in range(count)]
    objects = _place(rng, slots, colours, shapes, sizes)
    background = (_background_colour(rng), _background_colour(rng))
    return Scene(
        image_id=image_id,
        objects=objects,
        background=background,
        noise_seed=int(rng.integers(2**31)),
        captions=captions_for(objects),
        qa=tuple(questions_for(objects, rng)),
        style=style,
    )


def _place(rng, slots: list[int], colours: list[str], shapes: list[str], sizes: list[str]):
    """Sizes and centres drawn from continuous ranges, left to right, each shape's centre inside
    its third of the width (by POSITION_MARGIN), the shape inside the image and clear of its left
    neighbour; a shape that cannot fit is drawn again (the whole scene after 20 failed draws)."""
    for _ in range(100):
        objects: list[ShapeObject] = []
        right_edge = -math.inf
        for slot, colour, shape, size in zip(slots, colours, shapes, sizes, strict=True):
            obj = _draw_object(rng, slot, colour, shape, size, len(slots), right_edge)
            if obj is None:
                break
            objects.append(obj)
            right_edge = max(x for x, _ in outline_points(obj, 1.0))
        else:
            return tuple(objects)
    raise RuntimeError("could not place the shapes")  # never seen: the smallest sizes always fit


def _draw_object(rng, slot, colour, shape, size, count, right_edge) -> ShapeObject | None:
    third = IMAGE_SIZE / len(POSITIONS)
    low, high = CONTINUOUS_DIAMETERS[size]
    if size == "large":
        high = LARGE_MAX[count]
    for _ in range(20):
        diameter = float(rng.uniform(low, high))
        angle, aspect, form = _shape_pose(rng, shape)
        obj = ShapeObject(colour, shape, size, POSITIONS[slot], (0.0, 0.0), diameter, angle, aspect, form)
        points = outline_points(obj, 1.0)  # around (0, 0)
        left, right = -min(x for x, _ in points), max(x for x, _ in points)
        top, bottom = -min(y for _, y in points), max(y for _, y in points)
        x_low = max(third * slot + POSITION_MARGIN, left + 1, right_edge + left - BOX_OVERLAP)
        x_high = min(third * (slot + 1) - POSITION_MARGIN, IMAGE_SIZE - right - 1)
        if x_low > x_high or top + bottom + 2 > IMAGE_SIZE:
            continue
        x = float(rng.uniform(x_low, x_high))
        y = float(rng.uniform(top + 1, IMAGE_SIZE - bottom - 1))
        return ShapeObject(colour, shape, size, POSITIONS[slot], (x, y), diameter, angle, aspect, form)
    return None


def _shape_pose(rng: np.random.Generator, shape: str) -> tuple[float, float, str]:
    """(angle, aspect, form): only changes that keep the shape's name (a square turned by 45
    degrees would be a diamond, a long ellipse an oval)."""
    if shape == "circle":
        return float(rng.uniform(0, 180)), float(rng.uniform(0.9, 1.1)), ""
    if shape == "square":
        return float(rng.uniform(-20, 20)), float(rng.uniform(0.9, 1.1)), ""
    if shape == "cross":
        return float(rng.uniform(-15, 15)), float(rng.uniform(0.26, 0.45)), ""
    form = TRIANGLE_FORMS[int(rng.integers(len(TRIANGLE_FORMS)))]
    if form == "equilateral":
        return float(rng.uniform(0, 360)), 1.0, form
    # paint programs' triangles: in a box, upright or turned by quarter turns, a little tilted
    return float(90 * rng.integers(4) + rng.uniform(-12, 12)), float(rng.uniform(0.8, 1.15)), form


def outline_points(obj: ShapeObject, scale: float, offset: float = 0.0) -> list[tuple[float, float]]:
    """The polygon of a continuous-scene shape in pixels (design units times `scale`)."""
    radius = obj.diameter / 2
    if obj.shape == "circle":
        steps = 64
        local = [
            (radius * math.cos(t), radius * obj.aspect * math.sin(t))
            for t in (2 * math.pi * i / steps for i in range(steps))
        ]
    elif obj.shape == "square":
        half = radius * 0.9
        local = [
            (-half, -half * obj.aspect),
            (half, -half * obj.aspect),
            (half, half * obj.aspect),
            (-half, half * obj.aspect),
        ]
    elif obj.shape == "triangle":
        if obj.form == "equilateral":
            local = [
                (radius * math.cos(a), radius * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
            ]
        else:
            half_w, half_h = radius * 0.95, radius * 0.95 * obj.aspect
            apex_x = 0.0 if obj.form == "isosceles" else -half_w
            local = [(apex_x, -half_h), (half_w, half_h), (-half_w, half_h)]
    elif obj.shape == "cross":
        w = radius * obj.aspect
        corners = [(w, radius), (w, w), (radius, w), (radius, -w), (w, -w), (w, -radius)]
        local = corners + [(-dx, -dy) for dx, dy in corners]
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    turn = math.radians(obj.angle)
    cos, sin = math.cos(turn), math.sin(turn)
    x, y = obj.centre
    return [
        ((x + dx * cos - dy * sin) * scale + offset, (y + dx * sin + dy * cos) * scale + offset)
        for dx, dy in local
    ]


def _background_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light grey with a faint tint: never saturated enough to read as a shape colour, and
    always lighter than the dark outline every shape has."""
    grey = int(rng.integers(120, 236))
    tint = rng.integers(-18, 19, size=3)
    red, green, blue = (int(np.clip(grey + t, 0, 255)) for t in tint)
    return (red, green, blue)


def render(scene: Scene) -> Image.Image:
    """The scene's pixels, drawn by its style's renderer."""
    if scene.style == "random":
        from . import randomised

        return randomised.render(scene)
    if scene.style == "paint":
        from . import paint  # evaluation only: training refuses "paint" scenes (DataConfig)

        return paint.render(scene)
    return _render_classic(scene)


def _render_classic(scene: Scene) -> Image.Image:
    top, bottom = (np.array(c, dtype=np.float32) for c in scene.background)
    ramp = np.linspace(0.0, 1.0, IMAGE_SIZE, dtype=np.float32)[:, None, None]
    pixels = top + (bottom - top) * ramp
    noise = np.random.default_rng(scene.noise_seed).normal(0.0, 6.0, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    pixels = np.broadcast_to(pixels, (IMAGE_SIZE, IMAGE_SIZE, 3)) + noise
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj)
    return image


def object_map(scene: Scene) -> np.ndarray:
    """(H, W) uint8: 0 for background, i + 1 where object i (left to right) is drawn on top."""
    image = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(image)
    for index, obj in enumerate(scene.objects):
        if scene.style == "classic":
            _draw_shape(draw, obj, fill=index + 1)
        else:
            # pixel centres sit at half units: shift by -0.5 so the mask matches the drawing
            draw.polygon(outline_points(obj, 1.0, -0.5), fill=index + 1)
    return np.asarray(image)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: ShapeObject, fill=None) -> None:
    """Draw `obj` filled with its colour and a dark outline. The outline makes a shape's edges
    look the same whatever its colour: a ViT's patch embedding is linear in the pixels, so edges
    whose contrast changes sign with the colour are much slower for it to learn (measured: shape
    accuracy 0.47 without outlines after 500 pretraining steps)."""
    x, y = obj.centre
    r = obj.diameter / 2
    outline = OUTLINE if fill is None else None
    fill = COLOURS[obj.colour] if fill is None else fill
    if obj.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=outline)
    elif obj.shape == "square":
        s = r * 0.9  # a square of the same diameter looks bigger than the circle
        draw.rectangle([x - s, y - s, x + s, y + s], fill=fill, outline=outline)
    elif obj.shape == "triangle":
        angles = (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        draw.polygon([(x + r * math.cos(a), y + r * math.sin(a)) for a in angles], fill=fill, outline=outline)
    elif obj.shape == "cross":
        w = r * 0.38
        corners = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r)]
        points = [(x + dx, y + dy) for dx, dy in corners] + [(x - dx, y - dy) for dx, dy in corners]
        draw.polygon(points, fill=fill, outline=outline)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def captions_for(objects: tuple[ShapeObject, ...]) -> tuple[str, ...]:
    """The canonical caption first, then two paraphrases (references for BLEU / CIDEr)."""
    parts = [f"{o.phrase} {POSITION_PHRASES[o.position]}" for o in objects]
    canonical = _join(parts)
    plain = _join([o.short_phrase for o in objects])
    count = len(objects)
    noun = "shape" if count == 1 else "shapes"
    return (
        canonical,
        f"there is {canonical}",
        f"{NUMBER_WORDS[count]} {noun}: {plain}",
    )


def scene_code(objects: tuple[ShapeObject, ...]) -> str:
    """The scene as a fixed layout of 12 words: for each slot (left, middle, right) its name, then
    the size, colour and shape of its object, or "no no no". A prefix the language model can learn
    to read (see `TrainConfig.lm_prefix`); its words are all caption words, so no new tokens."""
    by_position = {o.position: o for o in objects}
    words = []
    for position in POSITIONS:
        obj = by_position.get(position)
        words += [position, *((obj.size, obj.colour, obj.shape) if obj else ("no", "no", "no"))]
    return " ".join(words)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def questions_for(objects: tuple[ShapeObject, ...], rng: np.random.Generator) -> list[QA]:
    """Every question template that applies to these objects (a fixed order; callers sample)."""
    qa: list[QA] = []
    count = len(objects)
    if count == 1:
        only = objects[0]
        qa += [
            QA("what colour is the shape?", only.colour, "colour"),
            QA("what shape is it?", only.shape, "shape"),
            QA("how big is the shape?", only.size, "size"),
            QA("where is the shape?", only.position, "position"),
        ]
    qa.append(QA("how many shapes are there?", NUMBER_WORDS[count], "count"))
    for obj in objects:
        qa += [
            QA(f"what colour is the {obj.shape}?", obj.colour, "colour"),
            QA(f"what shape is the {obj.colour} one?", obj.shape, "shape"),
            QA(f"what colour is the shape {POSITION_PHRASES[obj.position]}?", obj.colour, "colour"),
            QA(f"what shape is {POSITION_PHRASES[obj.position]}?", obj.shape, "shape"),
            QA(f"where is the {obj.colour} {obj.shape}?", obj.position, "position"),
            QA(f"is the {obj.colour} {obj.shape} small or large?", obj.size, "size"),
        ]
    present_colours = {o.colour for o in objects}
    present_shapes = {o.shape for o in objects}
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    qa.append(QA(f"is there a {colour} shape?", "yes" if colour in present_colours else "no", "yes/no"))
    qa.append(QA(f"is there a {shape}?", "yes" if shape in present_shapes else "no", "yes/no"))
    return qa


def generate_split(
    seed: int,
    split: str,
    size: int,
    unique_captions: bool = False,
    style: str = "classic",
    classic_share: float = 0.0,
) -> list[Scene]:
    """`size` scenes of `split` in `style`. With `classic_share`, that share of the scenes (drawn
    per index) is classic instead. With `unique_captions`, scenes whose canonical caption is
    already in the split are skipped, so a caption used as a retrieval query names one image."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    scenes: list[Scene] = []
    seen: set[str] = set()
    index = 0
    while len(scenes) < size:
        kind = style
        if (
            classic_share
            and np.random.default_rng([seed, _split_stream(split), index, 99]).random() < classic_share
        ):
            kind = "classic"
        scene = make_scene(seed, split, index, style=kind)
        index += 1
        if unique_captions:
            if scene.caption in seen:
                continue
            seen.add(scene.caption)
        scenes.append(scene)
    return scenes


def iter_corpus() -> Iterator[str]:
    """Every word and punctuation mark the synthetic text can use: to train the tokenizers on."""
    for colour in COLOURS:
        for shape in SHAPES:
            for size in SIZES:
                for position in POSITIONS:
                    obj = ShapeObject(colour, shape, size, position, (0, 0), 0)
                    yield f"{obj.phrase} {POSITION_PHRASES[position]}"
                    yield f"there is {obj.phrase}, {obj.phrase} and {obj.phrase}"
                    for qa in questions_for((obj,), np.random.default_rng(0)):
                        yield f"Question: {qa.question} Short answer: {qa.answer}"
    for count, word in NUMBER_WORDS.items():
        yield f"{word} {'shape' if count == 1 else 'shapes'}: an orange circle"
    yield "Question: is there a red shape? Answer: yes no"
    yield "Question: how many shapes are there? Short answer: one two three"
