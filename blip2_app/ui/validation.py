"""Checks on the values handlers receive: the browser's widgets and API callers send the same
payloads, so every value is checked by type and range and refused with a sentence naming it."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..engine import Engine, PreparedImage
from ..errors import InvalidRequestError
from ..prompts import clean_text
from .errors import user_error


def whole_number(value: Any, name: str, low: int, high: int) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or value != int(value)
    ):
        raise InvalidRequestError(f"{name} must be a whole number between {low} and {high}; got {value!r}.")
    number = int(value)
    if not low <= number <= high:
        raise InvalidRequestError(f"{name} must be between {low} and {high}; got {number}.")
    return number


def flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be true or false; got {value!r}.")
    return value


def optional_text(value: Any, name: str, max_chars: int) -> str:
    """Free text that may be empty (instruction, custom prompt): a string within the limit."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequestError(f"The {name} must be text; got {type(value).__name__}.")
    return clean_text(value, name, max_chars, required=False)


def one_line(text: str) -> str:
    return " ".join(text.split())


EMPTY_DRAWING = "The drawing is empty: draw something first (or switch to the Upload tab)."
BLANK_LEVEL = 250  # every channel of every pixel at least this: nothing drawn on the white canvas


def one_drawing(engine: Engine, drawing: Any) -> PreparedImage:
    """A sketchpad's drawing (the path or data URL of its composite) as an image: decoded by the
    same safe decoder and limits as an upload, its transparent canvas flattened onto white (the
    decoder does that for every image with alpha); refused when nothing is drawn."""
    if drawing is None or (isinstance(drawing, str) and not drawing.strip()):
        raise user_error(EMPTY_DRAWING)
    if not isinstance(drawing, str):
        raise InvalidRequestError("A drawing must be sent as an image file.")
    prepared = engine.prepare(drawing)[0]
    if min(low for low, _ in prepared.image.getextrema()) >= BLANK_LEVEL:
        raise user_error(EMPTY_DRAWING)
    return prepared


def one_image(engine: Engine, image: Any) -> PreparedImage:
    """The single image an endpoint takes, decoded safely (errors name what is wrong with it)."""
    if image is None or (isinstance(image, str) and not image.strip()):
        raise user_error("Please add an image first: upload one, paste one, or pick an example.")
    if isinstance(image, (list, tuple)):
        raise InvalidRequestError("This endpoint takes one image; use /index_gallery for several.")
    return engine.prepare(image)[0]
