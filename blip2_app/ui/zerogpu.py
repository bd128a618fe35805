"""ZeroGPU Spaces: a GPU is attached only while a function decorated with `spaces.GPU` runs.

A handler that calls the model says so where it is defined, with `@gpu(seconds=...)`: the longest
GPU time one call may book (ZeroGPU's default is 60 s; asking less gets a visitor queued sooner).
The tabs register model events through `TabContext.model_event` (ui/tabs/common.py), which books
the declared time with `on_gpu` and refuses a handler that declares none; `build_demo` then checks
that no declared handler was wired any other way. So a new handler cannot be forgotten.

The `spaces` package exists on Hugging Face Spaces only (it is not in requirements.txt); where it
is missing the handlers stay as they are, and where it is present but the Space has no ZeroGPU its
decorator does nothing. `import spaces` must come before torch touches CUDA, hence
`import_spaces()` at the very start of app.py's start-up.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

# The attribute `gpu` sets (not `gpu_seconds`: that is what `spaces.GPU` stubs in tests set).
_DECLARED = "declared_gpu_seconds"


def gpu(seconds: int) -> Callable[[F], F]:
    """Declares that the decorated handler runs the model, for at most `seconds` per call."""
    if not isinstance(seconds, int) or seconds < 1:
        raise ValueError(f"GPU time must be a whole number of seconds, at least 1; got {seconds!r}.")

    def declare(fn: F) -> F:
        setattr(fn, _DECLARED, seconds)
        return fn

    return declare


def declared_gpu_seconds(fn: Callable[..., Any]) -> int | None:
    """The seconds `fn` declared with `@gpu` (bound methods included), or None."""
    seconds = getattr(fn, _DECLARED, None)
    return seconds if isinstance(seconds, int) else None


def import_spaces() -> ModuleType | None:
    try:
        return importlib.import_module("spaces")
    except ImportError:
        return None


def on_gpu(fn: F, seconds: int, spaces: ModuleType | None) -> F:
    """`fn` decorated with `spaces.GPU(duration=seconds)`, or `fn` itself without `spaces`."""
    if spaces is None:
        return fn
    return spaces.GPU(duration=seconds)(fn)  # type: ignore[no-any-return,unused-ignore]  # spaces is untyped (absent here: Any)


def booked(fn: F, spaces: ModuleType | None) -> F:
    """`fn` with the GPU time it declared (see `on_gpu`); a handler that declared none is a bug."""
    seconds = declared_gpu_seconds(fn)
    if seconds is None:
        name = getattr(fn, "__qualname__", repr(fn))
        raise TypeError(
            f"{name} runs the model but declares no GPU time: decorate it with @gpu(seconds=...)."
        )
    return on_gpu(fn, seconds, spaces)
