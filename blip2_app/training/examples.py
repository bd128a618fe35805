"""The demo model's example pictures (assets/shapes-paint/): held-out "paint" scenes, drawn by the
independent renderer (paint.py) that training never sees, each with a question for the Chat tab.

The app shows them instead of the photo examples while shapes-demo is loaded (the registry entry's
`"examples"` names them). They are a pure function of the scene plan below, so they can be made
again bit for bit:

    python -m blip2_app.training.examples            # writes assets/shapes-paint/*.png
    python -m blip2_app.training.examples --check    # exits 1 if a file differs from a new render

and `registry_examples()` is the `"examples"` list registry.json carries for shapes-demo.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .synthetic import POSITION_PHRASES, Scene, ShapeObject, make_scene

SEED = 0  # the data's default seed: these are scenes of the held-out "paint" test split
SPLIT = "test"
MIN_SIDE = 192  # paint.py renders 64-512 px; small ones look blurry on screen
OUT_DIR = Path(__file__).resolve().parents[2] / "assets" / "shapes-paint"
REPO_ROOT = OUT_DIR.parents[1]


@dataclass(frozen=True)
class Wanted:
    """One example: how many objects, the shape (colour, size) one of them must have, the question."""

    count: int
    shape: str
    colour: str | None
    question: Callable[[ShapeObject], str]
    size: str | None = None


PLAN = (
    Wanted(1, "triangle", "red", lambda obj: f"what colour is the {obj.shape}?", "large"),
    Wanted(1, "square", "green", lambda obj: "what shape is it?", "large"),
    Wanted(1, "circle", "blue", lambda obj: "where is the shape?", "large"),
    Wanted(2, "cross", None, lambda obj: f"what shape is {POSITION_PHRASES[obj.position]}?"),
    Wanted(3, "triangle", None, lambda obj: "how many shapes are there?"),
)
MAX_BYTES = 60_000  # as PNG: skips the renders with photographic noise (they weigh 200+ KB)


@dataclass(frozen=True)
class Picture:
    name: str  # file name under OUT_DIR
    scene: Scene
    image: Image.Image
    question: str


def pictures() -> list[Picture]:
    """The first scene of the split (in index order) that fits each wanted example, renders at
    least MIN_SIDE px wide and at most MAX_BYTES, without repeating a colour-and-shape pair."""
    chosen: list[Picture] = []
    used: set[tuple[str, str]] = set()
    index = 0
    for wanted in PLAN:
        while True:
            scene = make_scene(SEED, SPLIT, index, count=wanted.count, style="paint")
            index += 1
            match = next(
                (
                    obj
                    for obj in scene.objects
                    if obj.shape == wanted.shape
                    and wanted.colour in (None, obj.colour)
                    and wanted.size in (None, obj.size)
                ),
                None,
            )
            pairs = {(obj.colour, obj.shape) for obj in scene.objects}
            if match is None or pairs & used:
                continue
            image = scene.render()
            if image.width < MIN_SIDE or len(_png(image)) > MAX_BYTES:
                continue
            used |= pairs
            words = "_".join(f"{obj.colour}_{obj.shape}" for obj in scene.objects)
            name = f"paint_{len(chosen) + 1}_{words}.png"
            chosen.append(Picture(name, scene, image, wanted.question(match)))
            break
    return chosen


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def registry_examples(folder: Path = OUT_DIR) -> list[dict[str, str]]:
    """The `"examples"` list of shapes-demo's registry entry (paths relative to the repository)."""
    relative = folder.resolve().relative_to(REPO_ROOT)
    return [{"image": f"{relative.as_posix()}/{p.name}", "question": p.question} for p in pictures()]


def differs(picture: Picture, folder: Path) -> bool:
    path = folder / picture.name
    if not path.is_file():
        return True
    with Image.open(path) as saved:
        return saved.size != picture.image.size or not np.array_equal(
            np.asarray(saved.convert("RGB")), np.asarray(picture.image.convert("RGB"))
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder to write the PNGs to")
    parser.add_argument("--check", action="store_true", help="only compare with the files there")
    args = parser.parse_args(argv)
    made = pictures()
    if args.check:
        stale = [p.name for p in made if differs(p, args.out)]
        for name in stale:
            print(f"differs from a new render: {args.out / name}", file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for picture in made:
        (args.out / picture.name).write_bytes(_png(picture.image))
        print(f"{args.out / picture.name}  {picture.scene.caption}  Q: {picture.question}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
