"""What a visitor sees when a handler fails: one specific sentence, never a traceback.

A `UserFacingError` or `ImageDecodeError` becomes `gr.Error` with the backend's own sentence;
running out of memory and a stalled stream get their own sentences; anything else is logged with
its traceback and the visitor gets a generic sentence naming what was being done. Degraded results
are `gr.Warning`s raised by the handlers themselves.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import queue
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import gradio as gr
import torch

from ..errors import UserFacingError
from ..images import ImageDecodeError

log = logging.getLogger(__name__)

INTERNAL_ERROR = (
    "BLIP-2 Studio hit an internal error while {what}. It has been logged for the maintainers; "
    "please try again, and report it if it keeps happening."
)
OUT_OF_MEMORY = (
    "The server ran out of memory while {what}. Try again with fewer beams, fewer captions, "
    "fewer new tokens or fewer images at once."
)
TIMED_OUT = "The model took too long while {what} and was stopped. Please try again in a moment."

F = TypeVar("F", bound=Callable[..., Any])


def escaped(text: str) -> str:
    """Text for a toast: Gradio renders them as HTML, and the text may quote file names or user input."""
    return html.escape(text, quote=False)


def user_error(text: str) -> gr.Error:
    """A `gr.Error` for the visitor's own mistake: shown as is, no traceback in the log."""
    return gr.Error(escaped(text), print_exception=False)


def to_gradio_error(error: Exception, what: str) -> gr.Error:
    """The `gr.Error` a visitor sees for `error` (logged with its traceback unless it is theirs)."""
    if isinstance(error, gr.Error):
        return error
    if isinstance(error, (UserFacingError, ImageDecodeError)):
        return user_error(str(error))
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        log.exception("Out of memory while %s", what)
        return gr.Error(OUT_OF_MEMORY.format(what=what), print_exception=False)
    if isinstance(error, queue.Empty):  # TextIteratorStreamer timed out waiting for a token
        log.exception("Generation timed out while %s", what)
        return gr.Error(TIMED_OUT.format(what=what), print_exception=False)
    log.exception("Unexpected error while %s", what)
    return gr.Error(INTERNAL_ERROR.format(what=what), print_exception=False)


def guarded(what: str) -> Callable[[F], F]:
    """Map exceptions to `gr.Error` (see `to_gradio_error`); works for generator handlers too.

    `functools.wraps` keeps the signature, which Gradio reads for API parameter names and for
    the `gr.Progress` default argument.
    """

    def decorate(fn: F) -> F:
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
                try:
                    yield from fn(*args, **kwargs)
                except Exception as error:  # GeneratorExit (client left) is not an Exception
                    raise to_gradio_error(error, what) from error

            return stream  # type: ignore[return-value]  # same signature: functools.wraps

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as error:
                raise to_gradio_error(error, what) from error

        return call  # type: ignore[return-value]  # same signature: functools.wraps

    return decorate
