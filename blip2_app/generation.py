"""Decoding settings: one validated dataclass, turned into `model.generate` keyword arguments."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from .errors import InvalidRequestError

Decoding = Literal["beam", "nucleus", "greedy"]
DECODINGS: tuple[str, ...] = ("beam", "nucleus", "greedy")

# Documented limits (README "Limits and safety"): past them a request is refused with a sentence
# naming the knob, so a typo such as num_beams=1000 cannot tie up the server for minutes.
LIMITS: dict[str, tuple[float, float]] = {
    "num_beams": (1, 10),
    "max_new_tokens": (1, 512),
    "min_new_tokens": (0, 512),
    "top_p": (0.01, 1.0),
    "temperature": (0.01, 5.0),
    "repetition_penalty": (0.5, 3.0),
    "length_penalty": (-5.0, 5.0),
    "no_repeat_ngram_size": (0, 10),
    "num_captions": (1, 10),
}


@dataclass(frozen=True)
class GenerationSettings:
    """How text is decoded. Defaults are LAVIS' (5 beams, 30 tokens, top_p 0.9, penalties 1.0)
    plus no_repeat_ngram_size=3, which stops the caption loops reported in LAVIS#472 and #713."""

    decoding: Decoding = "beam"
    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 1
    top_p: float = 0.9
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    num_captions: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.decoding not in DECODINGS:
            raise InvalidRequestError(
                f"Decoding must be one of {', '.join(DECODINGS)}; got {self.decoding!r}."
            )
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidRequestError(f"{name} must be a number; got {value!r}.")
            if name in {
                "num_beams",
                "max_new_tokens",
                "min_new_tokens",
                "no_repeat_ngram_size",
                "num_captions",
            }:
                if int(value) != value:
                    raise InvalidRequestError(f"{name} must be a whole number; got {value!r}.")
                object.__setattr__(self, name, int(value))
            if not low <= value <= high:
                raise InvalidRequestError(f"{name} must be between {low:g} and {high:g}; got {value:g}.")
        if self.min_new_tokens > self.max_new_tokens:
            raise InvalidRequestError(
                f"min_new_tokens ({self.min_new_tokens}) cannot exceed max_new_tokens ({self.max_new_tokens})."
            )
        if self.decoding == "beam" and self.num_captions > self.num_beams:
            raise InvalidRequestError(
                f"Beam search returns at most num_beams captions: asked for {self.num_captions} "
                f"with {self.num_beams} beams."
            )
        if self.decoding == "greedy" and self.num_captions > 1:
            raise InvalidRequestError(
                "Greedy decoding gives one caption; use beam search or sampling for several."
            )

    def replace(self, **changes: Any) -> GenerationSettings:
        """A validated copy with some fields changed (`None` values keep the current field)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate`, identical for the engine and a direct call."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "num_return_sequences": self.num_captions,
        }
        if self.decoding == "beam":
            kwargs.update(
                do_sample=False,
                num_beams=self.num_beams,
                length_penalty=self.length_penalty,
                early_stopping=True,
            )
        elif self.decoding == "nucleus":
            kwargs.update(
                do_sample=True, num_beams=1, top_p=self.top_p, temperature=self.temperature, top_k=0
            )
        else:
            kwargs.update(do_sample=False, num_beams=1)
        return kwargs
