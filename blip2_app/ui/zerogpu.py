"""ZeroGPU Spaces: a GPU is attached only while a function decorated with `spaces.GPU` runs.

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

# Longest GPU time a call may book (ZeroGPU's default is 60 s; asking less gets a visitor queued
# sooner). Indexing a full gallery is the long one.
GPU_SECONDS = {
    "example_caption": 60,
    "caption": 60,
    "answer": 60,
    "chat": 90,
    "regenerate": 90,
    "index_gallery": 180,
    "search_text": 60,
    "search_image": 60,
}


def import_spaces() -> ModuleType | None:
    try:
        return importlib.import_module("spaces")
    except ImportError:
        return None


def on_gpu(fn: F, seconds: int, spaces: ModuleType | None) -> F:
    """`fn` decorated with `spaces.GPU(duration=seconds)`, or `fn` itself without `spaces`."""
    if spaces is None:
        return fn
    return spaces.GPU(duration=seconds)(fn)


def wrap_handlers(handlers: Any, spaces: ModuleType | None) -> None:
    """Replace the model-calling methods of `handlers` (a StudioHandlers) by their GPU versions."""
    for name, seconds in GPU_SECONDS.items():
        setattr(handlers, name, on_gpu(getattr(handlers, name), seconds, spaces))
