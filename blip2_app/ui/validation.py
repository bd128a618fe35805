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


def one_image(engine: Engine, image: Any) -> PreparedImage:
    """The single image an endpoint takes, decoded safely (errors name what is wrong with it)."""
    if image is None or (isinstance(image, str) and not image.strip()):
        raise user_error("Please add an image first: upload one, paste one, or pick an example.")
    if isinstance(image, (list, tuple)):
        raise InvalidRequestError("This endpoint takes one image; use /index_gallery for several.")
    return engine.prepare(image)[0]
