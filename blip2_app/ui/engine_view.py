"""The engine as the UI reads it: the only module of the UI that looks inside `Engine`.

The tabs need a few facts about the loaded models (registry entries, device, notices) and the
chat's token stream. Both are read here and nowhere else, so a change in the engine's insides
(how the text model is held, what its stream yields) is ported in this one file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..engine import EMPTY_TEXT_NOTICE, Engine, PreparedImage
from ..generation import GenerationSettings
from ..prompts import ChatTurn
from ..registry import ModelEntry

# Shown (and given as a warning) when the model wrote nothing.
EMPTY_ANSWER = EMPTY_TEXT_NOTICE


@dataclass(frozen=True)
class LoadedModels:
    """What is loaded, as the header and the tabs show it."""

    captioner: ModelEntry | None  # the text-generating model (Caption and Chat tabs)
    matcher: ModelEntry | None  # the retrieval model (Retrieval tab)
    device: str | None  # where the text-generating model runs
    notices: tuple[str, ...]  # why a fallback model was loaded, and similar
    decoding: GenerationSettings  # the text model's default decoding (built-in without one)
    answer_decoding: GenerationSettings  # its decoding for single VQA answers

    @classmethod
    def of(cls, engine: Engine) -> LoadedModels:
        captioner = engine.captioner
        matcher = engine.matcher.entry if engine.matcher is not None else None
        notices = tuple(engine.notices)
        if captioner is None:
            return cls(None, matcher, None, notices, GenerationSettings(), GenerationSettings())
        return cls(
            captioner.entry,
            matcher,
            str(captioner.device),
            notices,
            engine.default_generation(),
            captioner.entry.answer_decoding,
        )


@dataclass(frozen=True)
class AnswerSoFar:
    """One step of a streamed chat answer: the text to show, and whether the model wrote nothing
    (then `text` is the notice saying so)."""

    text: str
    empty: bool = False


def answer_so_far(
    engine: Engine,
    image: PreparedImage,
    question: str,
    history: Sequence[ChatTurn],
    exemplars: Sequence[ChatTurn],
    instruction: str,
    generation: GenerationSettings,
) -> Iterator[AnswerSoFar]:
    """The chat answer as it grows (beam search: once, when done)."""
    for text in engine.chat_stream(image, question, history, exemplars, instruction, generation):
        yield AnswerSoFar(text, empty=text == EMPTY_TEXT_NOTICE)
