"""Text backends: where captions, answers and chat are generated (`--backend NAME`).

Adding a backend is one new module in this package with an `open_backend(entry, settings,
load_weights)` returning a `TextBackend` (see base.py), and one line in `BACKENDS` below (the
`--backend` flag takes its names from there); `ReusesChatPrefix` (base.py) is optional, for a
backend that can continue a chat from its last turn's state. The modules are imported when a
backend is opened, not here: `blip2_app.backends` stays torch-free.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from .base import AnswerDone, AnswerSoFar, StreamEvent, TextBackend

if TYPE_CHECKING:
    from ..config import Settings
    from ..loading import LoadedModel
    from ..registry import ModelEntry

# Loads a checkpoint into this process at the settings' precisions, after the memory check
# (startup's): what an in-process backend calls for its weights.
WeightLoader = Callable[["ModelEntry"], "LoadedModel"]
BackendFactory = Callable[["ModelEntry", "Settings", WeightLoader], TextBackend]


def _module(name: str) -> BackendFactory:
    """`open_backend` of the module `name` in this package, imported on first use."""

    def open_backend(entry: ModelEntry, settings: Settings, load_weights: WeightLoader) -> TextBackend:
        module = importlib.import_module(f"{__name__}.{name}")
        backend: TextBackend = module.open_backend(entry, settings, load_weights)
        return backend

    return open_backend


BACKENDS: dict[str, BackendFactory] = {
    "local": _module("local"),  # transformers, in this process
    "vllm": _module("vllm"),  # a vLLM server's OpenAI-compatible API
}

__all__ = [
    "BACKENDS",
    "AnswerDone",
    "AnswerSoFar",
    "BackendFactory",
    "StreamEvent",
    "TextBackend",
    "WeightLoader",
]
