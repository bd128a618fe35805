"""The decoding widgets' values as one typed request, and the widgets themselves.

Every tab that generates text shows some of the same knobs (decoding, beams, temperature, ...).
Their values travel together as a `DecodingInputs`, built from the widgets in one place and
turned into validated `GenerationSettings` in one place (`settings`); the widgets are made by
`decoding_choice` and `slider`, which refuse an out-of-range API value by its parameter name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import gradio as gr

from ..generation import LIMITS, GenerationSettings
from .components import named_choice, named_number
from .validation import whole_number

DECODING_CHOICES = [("Beam search", "beam"), ("Nucleus sampling", "nucleus"), ("Greedy", "greedy")]
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class DecodingInputs:
    """What the visitor set on the decoding widgets; `None` keeps the tab's default.

    Numbers arrive as the widgets send them (floats); `settings` checks each one.
    """

    decoding: str | None = None
    num_beams: float | None = None
    temperature: float | None = None
    top_p: float | None = None
    min_new_tokens: float | None = None
    max_new_tokens: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float | None = None
    no_repeat_ngram_size: float | None = None
    num_captions: float | None = None
    seed: float | None = None  # -1: a fresh random seed

    def settings(self, base: GenerationSettings) -> GenerationSettings:
        """`base` with the values given; a bad value raises InvalidRequestError naming it."""
        values: dict[str, Any] = asdict(self)
        seed = values.pop("seed")
        if seed is not None and seed != "":
            number = whole_number(seed, "seed", -1, MAX_SEED)
            # -1 clears the seed (`replace` would keep the base's for None).
            base = dataclasses.replace(base, seed=None if number < 0 else number)
        return base.replace(**values)  # GenerationSettings checks ranges and combinations


def slider(
    name: str,
    value: float,
    label: str,
    step: float,
    info: str | None = None,
    unsupported: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> gr.Slider | gr.Number:
    """A slider over the documented bounds (generation.LIMITS), enforced for API callers too: a value
    outside them, or not a finite number, is refused with a sentence naming the parameter.

    `unsupported`: knobs the backend cannot honour (Engine.unsupported_knobs): shown disabled, the
    reason as the slider's info; the API refuses them with the same reason."""
    low, high = LIMITS[name]
    if unsupported and name in unsupported:
        info, kwargs["interactive"] = unsupported[name], False
    return named_number(gr.Slider(low, high, value=value, step=step, label=label, info=info, **kwargs), name)


def decoding_choice(value: str, info: str | None) -> gr.Radio:
    """The decoding radio (beam search, nucleus sampling, greedy)."""
    return named_choice(gr.Radio(DECODING_CHOICES, value=value, label="Decoding", info=info), "decoding")


def seed_number() -> gr.Slider | gr.Number:
    return named_number(
        gr.Number(
            value=-1,
            label="Seed",
            info="-1 = random (sampling only)",
            precision=0,
            minimum=-1,
            maximum=MAX_SEED,
        ),
        "seed",
    )
