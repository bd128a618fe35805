"""The engine as the UI reads it: the only module of the UI that looks inside `Engine`.

The tabs need a few facts about the loaded models (registry entries, device, notices); they are
read here and nowhere else, so a change in how the engine holds its models is ported in this one
file. The chat's stream is the engine's public `chat_stream` (typed events from `backends`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import EMPTY_TEXT_NOTICE, Engine
from ..generation import GenerationSettings
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
        text = engine.text
        matcher = engine.matcher.entry if engine.matcher is not None else None
        notices = tuple(engine.notices)
        if text is None:
            return cls(None, matcher, None, notices, GenerationSettings(), GenerationSettings())
        return cls(
            text.entry,
            matcher,
            text.device,
            notices,
            engine.default_generation(),
            text.entry.answer_decoding,
        )
