"""Fair share: what one client (an IP address) may hold of the queue and of the session slots.

Gradio bounds the queue (`max_size`) and the sessions kept (`state_session_capacity`) for all
visitors together, so one client alone could fill either (threat model, finding 5): twenty
threads kept the 16-slot queue full, and 1,100 calls with fresh session hashes evicted everyone
else's chat and gallery. This middleware, in front of the event routes, refuses with 429 and a
sentence:
- a new queued request from a client that already has `max_pending` requests queued or running;
- a new session hash from a client that opened `max_new_sessions` sessions in the last window.

Behind a reverse proxy every visitor has the proxy's address unless the server is told to trust
its X-Forwarded-For (uvicorn's `--forwarded-allow-ips`, set by Gradio on Spaces): see
docs/threat-model.md.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .guard import ASGIApp, Receive, Scope, Send, client_address, replaying, reply, request_address

EVENT_ROUTES = ("/gradio_api/queue/join", "/gradio_api/run/")
_SESSION_HASH = re.compile(rb'"session_hash"\s*:\s*"([^"\\]{1,128})"')
_FN_INDEX = re.compile(rb'"fn_index"\s*:\s*(-?\d{1,12})\b')
UNKNOWN_EVENT = (
    "This app has no event number {index}; gradio_client finds endpoints by name (api_name), "
    "and the API page lists them."
)
TOO_MANY_PENDING = (
    "You already have {count} requests waiting or running on this server; please wait for them to "
    "finish before sending more."
)
TOO_MANY_SESSIONS = (
    "Too many new sessions were opened from your address in the last {minutes:g} minutes; please "
    "keep using an open tab, or try again later."
)


@dataclass(frozen=True)
class FairShareLimits:
    max_pending: int  # queued + running requests of one client
    max_new_sessions: int  # distinct session hashes one client may open per window
    window_s: float = 600.0
    max_clients: int = 10_000  # clients remembered (the oldest are forgotten first)

    def __post_init__(self) -> None:
        if self.max_pending < 1 or self.max_new_sessions < 1 or self.window_s <= 0:
            raise ValueError("fair-share limits must be positive")


class SessionLedger:
    """Session hashes each client opened, with when; bounded in clients and in hashes a client."""

    def __init__(self, limits: FairShareLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.opened: OrderedDict[str, OrderedDict[str, float]] = OrderedDict()

    def admit(self, client: str, session_hash: str) -> bool:
        """True if `session_hash` is known for `client` or may be opened now (then it is recorded)."""
        now = self.clock()
        sessions = self.opened.setdefault(client, OrderedDict())
        self.opened.move_to_end(client)
        while len(self.opened) > self.limits.max_clients:
            self.opened.popitem(last=False)
        if session_hash in sessions:
            sessions[session_hash] = now
            sessions.move_to_end(session_hash)
            return True
        horizon = now - self.limits.window_s
        recent = sum(1 for opened in sessions.values() if opened >= horizon)
        if recent >= self.limits.max_new_sessions:
            return False
        sessions[session_hash] = now
        while len(sessions) > 4 * self.limits.max_new_sessions:
            sessions.popitem(last=False)
        return True


def pending_by_client(queue: Any) -> Callable[[str], int]:
    """Counts the events of one client address in a Gradio queue, waiting or running.

    Reads Gradio 6's queue (`event_queue_per_concurrency_id`, `active_jobs`); tests/test_fair_share
    checks it against a running app, so a Gradio upgrade that moves these fails there."""

    def events() -> Iterable[Any]:
        for event_queue in queue.event_queue_per_concurrency_id.values():
            yield from event_queue.queue
        for job in queue.active_jobs:
            if job:
                yield from job

    def count(client: str) -> int:
        return sum(1 for event in events() if _event_client(event) == client)

    return count


def _event_client(event: Any) -> str | None:
    request = getattr(event, "request", None)
    return request_address(request) if request is not None else None


class FairShare:
    """`Middleware(FairShare, limits=...)`, placed after RequestGuard (which hands on the body in
    one piece). On its first request it attaches to the Gradio app it guards (`scope["app"]`):
    `pending` counts a client's requests in that app's queue, and the app's session store is
    told to evict sessions without state first (`evict_stateless_first`). Tests pass `pending`."""

    def __init__(
        self, app: ASGIApp, limits: FairShareLimits, pending: Callable[[str], int] | None = None
    ) -> None:
        self.app = app
        self.limits = limits
        self.pending = pending
        self.events: Any = None  # the Gradio app's event functions by fn_index, once attached
        self.attached = pending is not None
        self.sessions = SessionLedger(limits)

    def _attach(self, gradio_app: Any) -> None:
        self.attached = True
        if gradio_app is None or not hasattr(gradio_app, "get_blocks"):
            return
        blocks = gradio_app.get_blocks()
        self.pending = pending_by_client(blocks._queue)
        self.events = blocks.fns
        evict_stateless_first(gradio_app.state_holder)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.attached:
            self._attach(scope.get("app"))
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or scope.get("method") != "POST" or not _is_event_route(path):
            await self.app(scope, receive, send)
            return
        first = await receive()
        refusal = self._refusal(client_address(scope), path, first.get("body", b""))
        if refusal is not None:
            await reply(send, *refusal)
            return
        await self.app(scope, replaying(first, receive), send)

    def _refusal(self, client: str, path: str, body: bytes) -> tuple[int, str] | None:
        """(status, sentence) to refuse an event request with, or None to let it through."""
        index = _FN_INDEX.search(body)
        if index is not None and self.events is not None and int(index.group(1)) not in self.events:
            # Gradio answers an unknown fn_index with a bare 500.
            return 422, UNKNOWN_EVENT.format(index=int(index.group(1)))
        match = _SESSION_HASH.search(body)
        if match is not None and not self.sessions.admit(client, match.group(1).decode("ascii", "replace")):
            return 429, TOO_MANY_SESSIONS.format(minutes=self.limits.window_s / 60)
        if path.endswith("/queue/join") and self.pending is not None:
            count = self.pending(client)
            if count >= self.limits.max_pending:
                return 429, TOO_MANY_PENDING.format(count=count)
        return None


def _is_event_route(path: str) -> bool:
    return path.endswith(EVENT_ROUTES[0]) or EVENT_ROUTES[1] in path


def holds_state(session: Any) -> bool:
    """A Gradio SessionState that holds something of the visitor's (a chat, a gallery): any
    gr.State value other than None. Reading a State stores its default (None here) too."""
    return any(value is not None for value in session.state_data.values())


def evict_stateless_first(holder: Any) -> None:
    """Makes a Gradio `StateHolder` drop sessions that hold no state before any that does, so
    only sessions with a chat or a gallery count against --max-sessions (finding 5: 1,100
    stateless calls with fresh session hashes evicted every visitor's chat). Gradio 6's holder
    evicts the least recently used session whatever it holds; tests/test_fair_share checks this
    against the installed version."""

    def update(session_id: str) -> None:
        with holder.lock:
            sessions = holder.session_data
            if session_id in sessions:
                sessions.move_to_end(session_id)
            while len(sessions) > holder.capacity:
                others = [key for key in sessions if key != session_id]  # the one in use stays
                victim = next((key for key in others if not holds_state(sessions[key])), others[0])
                del sessions[victim]
                holder.time_last_used.pop(victim, None)

    holder.update = update
