"""An ASGI middleware in front of Gradio's routes for what Gradio 6.31 has no setting for.

- `GET /gradio_api/file=<URL>`: Gradio fetches any public http(s) URL and streams it back, which
  makes the app an open proxy. Only files are served here; URLs get 403 before any fetch.
- Request bodies outside the upload route: Gradio reads a JSON body of any size into memory
  (a base64 image in `/gradio_api/queue/join` included). Bodies over `max_body_bytes` get 413;
  multipart uploads are left to Gradio's own `max_file_size`, which streams them to disk.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

NO_URL_FETCH = "This server does not fetch URLs for its visitors: only its own files are served here."
_FILE_ROUTE = re.compile(r"/file=(.*)$", re.DOTALL)
_SCHEME = re.compile(r"^\s*[A-Za-z][A-Za-z0-9+.\-]*:")
UPLOAD_ROUTES = ("/gradio_api/upload",)
BODY_READ_TIMEOUT_S = 15.0
BUFFERED_BODIES = 4  # bodies of the largest size held at once, all clients together
SLOW_BODY = (
    "The request body stopped arriving for {seconds:g} s, so the server dropped it; please send it again."
)
BUSY_RECEIVING = "The server is busy receiving other large requests; please try again in a moment."
NO_DEEP_LINKS = "Deep links are turned off on this server: a conversation is never published as a link."


def body_limit_bytes(max_upload_mb: int) -> int:
    """Largest JSON body accepted: one image of the upload limit as base64 (4/3 larger), plus 1 MB."""
    return max_upload_mb * 1024 * 1024 * 4 // 3 + 1024 * 1024


def _fetches_url(path: str) -> bool:
    match = _FILE_ROUTE.search(path)
    if match is None:
        return False
    target = match.group(1)
    for _ in range(3):  # "http%253A//..." decodes in steps
        if _SCHEME.match(target) or target.lstrip().startswith("//"):
            return True
        decoded = unquote(target)
        if decoded == target:
            break
        target = decoded
    return False


class RequestGuard:
    """`app_kwargs={"middleware": [Middleware(RequestGuard, max_body_bytes=...)]}` in launch().

    Bodies are read before Gradio sees them, so three bounds hold here: each body's size
    (`max_body_bytes`), the bytes held for all bodies being read at once (`max_buffered_bytes`;
    twenty slow 33 MB bodies held 660 MB before), and the wait for the next piece of a body
    (`read_timeout_s`; a client that stops sending mid-body is dropped instead of held)."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        max_buffered_bytes: int | None = None,
        read_timeout_s: float = BODY_READ_TIMEOUT_S,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_buffered_bytes = max_buffered_bytes or BUFFERED_BODIES * max_body_bytes
        self.read_timeout_s = read_timeout_s
        self.buffered = 0  # bytes of all bodies being read right now (one event loop: no lock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        raw = scope.get("raw_path") or b""
        if _fetches_url(path) or _fetches_url(raw.decode("latin-1")):
            await reply(send, 403, NO_URL_FETCH)
            return
        if _is_deep_link(path):
            await reply(send, 404, NO_DEEP_LINKS)
            return
        if scope.get("method") in ("POST", "PUT", "PATCH") and not path.rstrip("/").endswith(UPLOAD_ROUTES):
            await self._buffered(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _buffered(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await reply(send, 413, self._too_large())
            return
        body = bytearray()
        try:
            refusal = await self._read(receive, body)
        finally:
            self.buffered -= len(body)
        if refusal is not None:
            if refusal[0]:
                await reply(send, *refusal)
            return
        whole = {"type": "http.request", "body": bytes(body), "more_body": False}
        await self.app(scope, replaying(whole, receive), send)

    async def _read(self, receive: Receive, body: bytearray) -> tuple[int, str] | None:
        """Reads the whole body into `body`; returns (status, sentence) to refuse it, (0, "") when
        the client left, None when the body is complete."""
        more = True
        while more:  # chunked bodies have no length: count while reading
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except asyncio.TimeoutError:
                return 408, SLOW_BODY.format(seconds=self.read_timeout_s)
            if message["type"] == "http.disconnect":
                return 0, ""
            chunk = message.get("body", b"")
            body += chunk
            self.buffered += len(chunk)
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return 413, self._too_large()
            if self.buffered > self.max_buffered_bytes:
                return 503, BUSY_RECEIVING
        return None

    def _too_large(self) -> str:
        limit = self.max_body_bytes / (1024 * 1024)
        return (
            f"This request is larger than the server accepts ({limit:.0f} MB): upload images as files "
            "(gradio_client: handle_file) instead of embedding them in the request."
        )


def _is_deep_link(path: str) -> bool:
    """Gradio's deep-link route publishes a session's outputs by its hash (finding 6)."""
    return "/deep_link" in path.lower()


def replaying(first: Message, receive: Receive) -> Receive:
    """A `receive` that hands on `first` (a body already read here) and then the real stream."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return first
        return await receive()

    return replay


def client_address(scope: Scope) -> str:
    """The client's address for per-client limits (see `trusted_address`)."""
    client: Any = scope.get("client")
    peer = str(client[0]) if client else "unknown"
    return trusted_address(peer, header(scope, b"x-forwarded-for").decode("latin-1"))


def request_address(request: Any) -> str:
    """`client_address` for a handler's `gr.Request` (a Starlette request underneath)."""
    client = getattr(request, "client", None)
    headers = getattr(request, "headers", None) or {}
    return trusted_address(str(getattr(client, "host", None) or "unknown"), headers.get("x-forwarded-for"))


def trusted_address(peer: str, forwarded_for: str | None) -> str:
    """Behind a reverse proxy (the peer is a loopback or private address and sent
    X-Forwarded-For) the address the proxy saw; from a public peer the header is ignored, since
    anyone can write it."""
    if forwarded_for and _is_private(peer):
        first = forwarded_for.split(",")[0].strip()
        if first:
            return first
    return peer


def _is_private(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private


def header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return bytes(value)
    return b""


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers") or []:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def reply(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
