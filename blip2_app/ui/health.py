"""Readiness: `GET /healthz` says 503 while the model loads and 200 once the app serves.

While the model loads, `loading_page.LoadingServer` holds the app's port and answers /healthz with
503. When the model is in, the loading server closes and Gradio takes the same port; `HealthRoute`
then answers /healthz with 200 and what is loaded (read at each request: packing progresses).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .guard import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:  # type names only: a real import would pull torch in through the engine
    from ..engine import Engine

HEALTH_PATH = "/healthz"


def readiness(engine: Engine) -> dict[str, Any]:
    """What /healthz reports once the app serves."""
    text, matcher = engine.text, engine.matcher
    weights = text.loaded if text is not None else matcher  # None: text generated elsewhere
    return {
        "status": "ready",
        "model": text.entry.name if text is not None else None,
        "retrieval_model": matcher.entry.name if matcher is not None else None,
        "device": text.device if text is not None else str(matcher.device) if matcher is not None else None,
        "precision": weights.precisions.as_dict() if weights is not None else None,
        "backend": text.name if text is not None else "local",  # retrieval only: all in this process
        # Packing dynamic-int8 layers after the start (packing.py): layers packed so far, and the
        # seconds it took once done; None when there is nothing to pack.
        "packing": weights.packer.status() if weights is not None and weights.packer is not None else None,
    }


class HealthRoute:
    """ASGI middleware answering `GET /healthz` with `payload()` (200) before Gradio's routes."""

    def __init__(self, app: ASGIApp, payload: Callable[[], Mapping[str, Any]]) -> None:
        self.app = app
        self.payload = payload

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != HEALTH_PATH or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {
                "type": "http.response.body",
                "body": b"" if scope["method"] == "HEAD" else json.dumps(dict(self.payload())).encode(),
            }
        )
