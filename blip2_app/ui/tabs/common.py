"""What every tab's `build` receives, and the two kinds of events it wires.

Model events (they run the model) share one concurrency group, whose size is `--concurrency`, and
book the GPU time their handler declares (`@gpu`, ui/zerogpu.py): both come from
`TabContext.model_event`. Caption and answer events (`TabContext.batched_model_event`) have a
group of their own, `--max-batch-size` wide, so requests that arrive together can wait together
and run as one engine batch (blip2_app/batching.py; one batch runs at a time). Every other event is UI plumbing: private, and off the queue
(`UI_ONLY`) when it does not touch the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from types import ModuleType
from typing import Any, TypeVar

import gradio as gr

from ...batching import BatchLimits, TextBatcher
from ...config import Settings
from ...engine import Engine
from ..engine_view import LoadedModels
from ..zerogpu import booked, declared_gpu_seconds

MODEL_GROUP = "model"
BATCHED_GROUP = "model-batched"  # caption and answer requests, which wait to run as one batch
MODEL_GROUPS = (MODEL_GROUP, BATCHED_GROUP)
IMAGE_SOURCES = ["upload", "clipboard", "webcam"]
UI_ONLY: dict[str, Any] = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
# Private events that cost real CPU without the model (re-encoding 200 thumbnails: 0.6-0.8 s) wait
# their turn in the queue, one at a time, and count against a client's share of it: six callers
# at once slowed everyone down tenfold when they ran outside it (threat model, finding 6).
UI_QUEUED: dict[str, Any] = {
    "api_visibility": "private",
    "show_progress": "hidden",
    "concurrency_id": "ui-work",
    "concurrency_limit": 1,
}

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class TabContext:
    """The app's settings and engine, and what the tabs share (example photos, GPU booking)."""

    settings: Settings
    engine: Engine
    spaces: ModuleType | None  # the `spaces` package on a Hugging Face Space, else None
    examples: list[str] = field(default_factory=list)  # paths of the bundled example photos

    @property
    def models(self) -> LoadedModels:
        return LoadedModels.of(self.engine)

    @property
    def unsupported(self) -> dict[str, str]:
        """Decoding knobs the backend cannot honour, each with its reason (e.g. beams with vLLM)."""
        return self.engine.unsupported_knobs()

    @property
    def state_ttl(self) -> float:
        """Seconds a chat or gallery is kept unused."""
        return self.settings.session_ttl_minutes * 60

    def on_gpu(self, handler: F) -> F:
        """`handler` booking the GPU time it declared (see ui/zerogpu.py)."""
        return booked(handler, self.spaces)

    def model_event(self, handler: Callable[..., Any]) -> dict[str, Any]:
        """Keyword arguments of an event that runs `handler` on the model."""
        return {
            "fn": self.on_gpu(handler),
            "concurrency_limit": self.settings.concurrency,
            "concurrency_id": MODEL_GROUP,
        }

    @cached_property
    def batcher(self) -> TextBatcher:
        """The app's one caption-and-answer batcher (see blip2_app/batching.py)."""
        limits = BatchLimits(
            self.settings.max_batch_size,
            self.settings.batch_wait_ms / 1000,
            self.settings.batch_max_wait_ms / 1000,
        )
        return TextBatcher(self.engine, limits, batch_quantized=self.settings.batch_quantized)

    def batched_model_event(self, handler: Callable[..., Any]) -> dict[str, Any]:
        """`model_event`, for a handler that generates through `batcher`: up to `--max-batch-size`
        such requests are let in at once, to wait for each other there. Where the batcher cannot
        batch (a vLLM server, a batch-dependent precision) the event is an ordinary model event."""
        if not self.batcher.batches or self.settings.max_batch_size == 1:
            return self.model_event(handler)
        return {
            "fn": self.on_gpu(handler),
            "concurrency_limit": self.settings.max_batch_size,
            "concurrency_id": BATCHED_GROUP,
        }


def unbooked_handlers(demo: gr.Blocks) -> list[str]:
    """Handlers that declare GPU time but were wired without `TabContext.model_event`."""
    return [
        getattr(block_fn.fn, "__qualname__", "?")
        for block_fn in demo.fns.values()
        if block_fn.fn is not None
        and block_fn.concurrency_id not in MODEL_GROUPS
        and declared_gpu_seconds(block_fn.fn) is not None
    ]
