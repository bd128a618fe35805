"""Synthetic scenes turned into the tensors and token lists the training phases read.

Images are rendered once and passed through the same image processor the checkpoint ships with,
so training sees exactly the pixels the app will feed the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import synthetic
from .synthetic import COLOURS, POSITIONS, SHAPES, SIZES, Scene

# Label 0 is "nothing here" for every attribute.
NUM_COLOURS = len(COLOURS) + 1
NUM_SHAPES = len(SHAPES) + 1
NUM_SIZES = len(SIZES) + 1
ATTRIBUTE_CLASSES = (NUM_COLOURS, NUM_SHAPES, NUM_SIZES)
# A patch is labelled with an object when that object covers at least this share of it.
PATCH_COVERAGE = 0.25


@dataclass
class ShapesData:
    scenes: list[Scene]
    pixels: torch.Tensor  # (n, 3, H, W) float, normalised as the image processor does
    # (n, patches, 4): colour, shape, size of the object in each patch, and its number (1-3, 0: none)
    patch_labels: torch.Tensor
    object_labels: torch.Tensor  # (n, 3, 3): colour, shape, size of objects 1-3 (left to right)
    slot_labels: torch.Tensor  # (n, 3 slots, 3): colour, shape, size of the object in each slot
    counts: torch.Tensor  # (n,): number of objects - 1

    def __len__(self) -> int:
        return len(self.scenes)

    @classmethod
    def build(
        cls,
        seed: int,
        split: str,
        size: int,
        image_processor,
        grid: int,
        unique_captions: bool = False,
        style: str = "classic",
        classic_share: float = 0.0,
    ) -> ShapesData:
        """The split's scenes, rendered."""
        if style == "paint":
            raise ValueError("paint scenes are for evaluation only: training never sees that renderer")
        scenes = synthetic.generate_split(
            seed, split, size, unique_captions=unique_captions, style=style, classic_share=classic_share
        )
        return cls.rendered(scenes, image_processor, grid)

    @classmethod
    def rendered(
        cls, scenes: list[Scene], image_processor, grid: int, borrow: ShapesData | None = None
    ) -> ShapesData:
        """`scenes` rendered; rows where `borrow` holds the same scene at the same index take its
        pixels instead of rendering them again (a scene's pixels are a function of it)."""
        if borrow is None:
            return cls.from_scenes(scenes, render_pixels(scenes, image_processor), grid)
        new = new_rows(scenes, borrow.scenes)
        return cls.from_scenes(
            scenes,
            fill_pixels(len(scenes), new, render_pixels([scenes[i] for i in new], image_processor), borrow),
            grid,
        )

    @classmethod
    def from_scenes(cls, scenes: list[Scene], pixels: torch.Tensor, grid: int) -> ShapesData:
        """The data of `scenes` with their pixels: the labels follow from the scenes."""
        if len(pixels) != len(scenes):
            raise ValueError(f"{len(pixels)} pictures for {len(scenes)} scenes")
        patch = np.stack([patch_attributes(scene, grid) for scene in scenes])
        slots = np.stack([slot_attributes(scene) for scene in scenes])
        objects = np.zeros((len(scenes), len(POSITIONS), 3), dtype=np.int64)
        for row, scene in enumerate(scenes):
            for index, obj in enumerate(scene.objects):
                objects[row, index] = attributes(obj)
        return cls(
            scenes=scenes,
            pixels=pixels,
            patch_labels=torch.from_numpy(patch).long(),
            object_labels=torch.from_numpy(objects).long(),
            slot_labels=torch.from_numpy(slots).long(),
            counts=torch.tensor([len(scene.objects) - 1 for scene in scenes]),
        )


def new_rows(scenes: Sequence[Scene], known: Sequence[Scene]) -> list[int]:
    """Indices of `scenes` whose scene is not `known`'s at the same index: the ones to render."""
    return [i for i, scene in enumerate(scenes) if i >= len(known) or known[i] != scene]


def fill_pixels(count: int, rows: Sequence[int], rendered: torch.Tensor, borrow: ShapesData) -> torch.Tensor:
    """(count, 3, H, W): `rendered` at `rows` (`new_rows`), `borrow`'s pixels at every other index."""
    pixels = torch.empty((count, *borrow.pixels.shape[1:]), dtype=borrow.pixels.dtype)
    borrowed = torch.ones(count, dtype=torch.bool)
    borrowed[list(rows)] = False
    index = borrowed.nonzero().squeeze(1)
    pixels[index] = borrow.pixels[index]
    if len(rows):
        pixels[list(rows)] = rendered
    return pixels


def render_pixels(scenes: Sequence[Scene], image_processor, chunk: int = 512) -> torch.Tensor:
    """(n, 3, H, W) float32: each scene rendered and passed through `image_processor`."""
    if not scenes:
        return torch.empty(0)
    pixels = [
        image_processor(
            [scene.render() for scene in scenes[start : start + chunk]], return_tensors="pt"
        ).pixel_values
        for start in range(0, len(scenes), chunk)
    ]
    return torch.cat(pixels)


def attributes(obj: synthetic.ShapeObject) -> tuple[int, int, int]:
    return (list(COLOURS).index(obj.colour) + 1, SHAPES.index(obj.shape) + 1, SIZES.index(obj.size) + 1)


def patch_attributes(scene: Scene, grid: int) -> np.ndarray:
    """(grid * grid, 4): for each ViT patch (row-major, as the ViT orders them) the attributes of
    the object covering most of it and that object's number (1 = leftmost), or zeros. This dense
    target makes every patch token describe what is under it, which is what the Q-Former's
    cross-attention later reads."""
    owner = synthetic.object_map(scene)
    if owner.shape[0] % grid:
        raise ValueError(f"a {grid}x{grid} patch grid does not divide {owner.shape[0]} pixels")
    patch_size = owner.shape[0] // grid
    blocks = owner.reshape(grid, patch_size, grid, patch_size).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    table = np.zeros((len(scene.objects) + 1, 4), dtype=np.int64)
    for index, obj in enumerate(scene.objects):
        table[index + 1] = (*attributes(obj), index + 1)
    counts = np.stack([(blocks == i).sum(axis=1) for i in range(len(scene.objects) + 1)], axis=1)
    counts[:, 0] = 0
    best = counts.argmax(axis=1)
    best[counts.max(axis=1) < PATCH_COVERAGE * patch_size * patch_size] = 0
    return table[best]


def slot_attributes(scene: Scene) -> np.ndarray:
    slots = np.zeros((len(POSITIONS), 3), dtype=np.int64)
    for obj in scene.objects:
        slots[POSITIONS.index(obj.position)] = attributes(obj)
    return slots


def perturb(scene: Scene, rng: np.random.Generator) -> str:
    """A caption for a scene that differs from `scene` in one detail: a hard negative for ITC/ITM
    (one colour, shape or size changed, an object moved, or two colours swapped)."""
    objects = list(scene.objects)
    choices = ["colour", "shape", "size"]
    free_slots = [p for p in POSITIONS if p not in {o.position for o in objects}]
    if free_slots:
        choices.append("move")
    if len(objects) > 1:
        choices.append("swap")
    kind = choices[int(rng.integers(len(choices)))]
    i = int(rng.integers(len(objects)))
    obj = objects[i]
    used_colours = {o.colour for o in objects}
    used_shapes = {o.shape for o in objects}
    if kind == "colour":
        new = [c for c in COLOURS if c not in used_colours]
        objects[i] = _replace(obj, colour=new[int(rng.integers(len(new)))])
    elif kind == "shape":
        new = [s for s in SHAPES if s not in used_shapes]
        objects[i] = _replace(obj, shape=new[int(rng.integers(len(new)))])
    elif kind == "size":
        objects[i] = _replace(obj, size="large" if obj.size == "small" else "small")
    elif kind == "move":
        objects[i] = _replace(obj, position=free_slots[int(rng.integers(len(free_slots)))])
    else:
        j = (i + 1 + int(rng.integers(len(objects) - 1))) % len(objects)
        objects[i], objects[j] = (
            _replace(obj, colour=objects[j].colour),
            _replace(objects[j], colour=obj.colour),
        )
    objects.sort(key=lambda o: POSITIONS.index(o.position))
    return synthetic.captions_for(tuple(objects))[0]


def _replace(obj: synthetic.ShapeObject, **changes) -> synthetic.ShapeObject:
    return dataclasses.replace(obj, **changes)


PHRASE_FORMS = ("the {colour} {shape}", "a {colour} {shape}", "{colour} {shape}", "the {shape} is {colour}")

# How people name one attribute alone: a search's negative text ("a red shape"), a zero-shot label in
# the Explain tab's default template ("a photo of {}"), a bare word.
COLOUR_FORMS = ("{}", "a {} shape", "the {} shape", "{} shapes", "a photo of {}", "a picture of {}")
SHAPE_FORMS = ("{}", "a {}", "the {}", "a {} shape", "a photo of a {}", "a picture of a {}")


def attribute_queries(scenes: list[Scene], rng: np.random.Generator) -> tuple[list[str], torch.Tensor]:
    """Every colour, then every shape, named alone in a form drawn for each, and which of `scenes`
    they are true of: (texts, (len(scenes), len(texts)) bool)."""
    colours = [COLOUR_FORMS[int(rng.integers(len(COLOUR_FORMS)))].format(c) for c in COLOURS]
    shapes = [SHAPE_FORMS[int(rng.integers(len(SHAPE_FORMS)))].format(s) for s in SHAPES]
    truth = [
        [c in {o.colour for o in scene.objects} for c in COLOURS]
        + [s in {o.shape for o in scene.objects} for s in SHAPES]
        for scene in scenes
    ]
    return colours + shapes, torch.tensor(truth)


def supervised_contrast(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over the true (row, column) pairs of -log p, where each true pair competes with the false
    pairs of its row only (not with the row's other true pairs), so every true pair must score above
    every false one, not just the easiest. Rows without a false pair add nothing."""
    negatives = sim.masked_fill(positive, float("-inf")).logsumexp(dim=1, keepdim=True)
    losses = torch.logaddexp(sim, negatives) - sim
    return losses[positive & negatives.isfinite()].mean()


def phrase_pair(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """(a phrase naming one object of `scene`, the same phrase made false): "the red circle" and
    "the blue circle" on an image whose circle is red, the Explain tab's kind of query. The false
    one changes the colour (to another object's colour half the time: a binding error) or the
    shape."""
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    form = PHRASE_FORMS[int(rng.integers(len(PHRASE_FORMS)))]
    others = [o.colour for o in scene.objects if o is not obj]
    if rng.random() < 0.7:
        if others and rng.random() < 0.5:
            wrong = {"colour": others[int(rng.integers(len(others)))], "shape": obj.shape}
        else:
            absent = [c for c in COLOURS if c not in {o.colour for o in scene.objects}]
            wrong = {"colour": absent[int(rng.integers(len(absent)))], "shape": obj.shape}
    else:
        absent_shapes = [sh for sh in SHAPES if sh not in {o.shape for o in scene.objects}]
        wrong = {"colour": obj.colour, "shape": absent_shapes[int(rng.integers(len(absent_shapes)))]}
    return form.format(colour=obj.colour, shape=obj.shape), form.format(**wrong)
