"""Which example pictures the Caption and Chat tabs offer: the loaded model's own (its registry
entry's `"examples"`, e.g. the demo model's drawings of shapes, each with a question), or else the
bundled photos (assets/examples/)."""

from __future__ import annotations

from dataclasses import dataclass

from .common import TabContext

PHOTOS_LABEL = "Example photos (public domain / CC0)"


@dataclass(frozen=True)
class ExampleSet:
    label: str
    images: tuple[str, ...]
    questions: tuple[str, ...]  # one per image; "" where the entry gives none

    @property
    def has_questions(self) -> bool:
        return any(self.questions)


def examples_for(context: TabContext) -> ExampleSet:
    """The text model's own examples if its entry names some, else the photos."""
    captioner = context.models.captioner
    if captioner is not None and captioner.examples:
        return ExampleSet(
            f"Example pictures for {captioner.name}",
            tuple(example.image for example in captioner.examples),
            tuple(example.question for example in captioner.examples),
        )
    photos = tuple(context.examples)
    return ExampleSet(PHOTOS_LABEL, photos, ("",) * len(photos))
