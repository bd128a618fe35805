"""Fair share per client (threat model, finding 5): the queue and the session slots."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from blip2_app.ui.fair_share import FairShare, FairShareLimits, SessionLedger, pending_by_client

LIMITS = FairShareLimits(max_pending=2, max_new_sessions=3, window_s=60)


async def _ok(scope, receive, send):
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def call(guard, path: str, session_hash: str, client: str = "198.51.100.1") -> int:
    body = json.dumps({"data": [], "fn_index": 0, "session_hash": session_hash}).encode()
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "client": (client, 5)}
    asyncio.run(guard(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_one_client_cannot_open_sessions_without_end():
    # 1,100 fresh session hashes from one address evicted every visitor's chat (finding 5).
    guard = FairShare(_ok, LIMITS)
    statuses = [call(guard, "/gradio_api/run/predict", f"s{i}") for i in range(6)]
    assert statuses == [200, 200, 200, 429, 429, 429]
    assert call(guard, "/gradio_api/run/predict", "s1") == 200  # an open session goes on
    assert call(guard, "/gradio_api/queue/join", "new", client="203.0.113.5") == 200  # others too


def test_the_session_window_slides():
    now = [0.0]
    ledger = SessionLedger(LIMITS, clock=lambda: now[0])
    assert all(ledger.admit("a", f"s{i}") for i in range(3))
    assert not ledger.admit("a", "s3")
    now[0] = 61
    assert ledger.admit("a", "s3")


def test_one_client_cannot_fill_the_queue():
    # Twenty threads of one client kept the 16-slot queue full for everyone (finding 5).
    mine = SimpleNamespace(request=SimpleNamespace(client=SimpleNamespace(host="198.51.100.1")))
    theirs = SimpleNamespace(request=SimpleNamespace(client=SimpleNamespace(host="203.0.113.5")))
    queue = SimpleNamespace(
        event_queue_per_concurrency_id={"model": SimpleNamespace(queue=[mine, theirs])},
        active_jobs=[[mine], None],
    )
    guard = FairShare(_ok, LIMITS, pending=pending_by_client(queue))
    assert call(guard, "/gradio_api/queue/join", "s0") == 429  # two of its own already there
    assert call(guard, "/gradio_api/queue/join", "t0", client="203.0.113.5") == 200
    assert call(guard, "/gradio_api/run/predict", "s0") == 200  # un-queued UI events are not counted


def test_stateless_sessions_are_evicted_before_ones_that_hold_a_chat():
    import gradio as gr
    from gradio.state_holder import StateHolder

    from blip2_app.ui.fair_share import evict_stateless_first

    with gr.Blocks() as demo:
        chat = gr.State(None)
    holder = StateHolder()
    holder.set_blocks(demo)
    holder.capacity = 3
    evict_stateless_first(holder)
    holder["visitor"][chat._id] = ["a conversation"]
    for i in range(50):  # an attacker's fresh session hashes, each touched once
        holder[f"fresh{i}"][chat._id]
    assert "visitor" in holder
    assert len(holder.session_data) == 3
    for i in range(5):  # every other session holds a chat: the newest one is still kept
        holder[f"chat{i}"][chat._id] = ["another conversation"]
    assert "chat4" in holder and len(holder.session_data) == 3
    plain = StateHolder()
    plain.set_blocks(demo)
    plain.capacity = 3
    plain["visitor"][chat._id] = ["a conversation"]
    for i in range(50):
        plain[f"fresh{i}"][chat._id]
    assert "visitor" not in plain  # Gradio's own policy: the visitor's chat is gone


def test_one_client_cannot_empty_everyone_elses_galleries():
    # 33 one-image galleries from one address evicted another visitor's gallery (finding 5).
    from blip2_app.ui.sessions import GalleryBudget, GallerySession

    class Held(GallerySession):
        def __len__(self) -> int:
            return 0 if self.evicted else 1

    budget = GalleryBudget(limit=4, per_owner=2)
    visitor = Held(owner="203.0.113.5")
    with budget.use(visitor):
        pass
    attacker = [Held(owner="198.51.100.1") for _ in range(33)]
    for gallery in attacker:
        with budget.use(gallery):
            pass
    assert not visitor.evicted
    assert sum(not g.evicted for g in attacker) == 2  # its own share, the newest two
    assert not attacker[-1].evicted and not attacker[-2].evicted
    plain = GalleryBudget(limit=4)
    other = Held(owner="203.0.113.5")
    with plain.use(other):
        pass
    for gallery in [Held(owner="198.51.100.1") for _ in range(33)]:
        with plain.use(gallery):
            pass
    assert other.evicted  # without a per-client share the visitor's gallery goes
