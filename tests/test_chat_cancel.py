"""A chat a visitor cancels (or leaves) stops generating (threat model, finding 2).

Before, 8 `/chat` requests cancelled at their first token went on burning CPU in orphan threads,
outside `--concurrency`. The app runs in this process here, so the language model's forward
passes can be counted: after a cancel they stop, far short of the answer's length.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from running_app import free_port

from blip2_app.config import Settings
from blip2_app.startup import load_engine

ROOT = Path(__file__).resolve().parents[1]
PHOTO = str(sorted((ROOT / "assets" / "examples").glob("*.*"))[0])
LONG = 400  # new tokens asked for


@pytest.fixture(scope="module")
def counted_app():
    from blip2_app.ui import build_demo, launch_options

    settings = Settings(model="tiny-random", port=free_port())
    engine = load_engine(settings)
    calls: list[float] = []
    language_model = engine.text.loaded.model.language_model
    hook = language_model.register_forward_pre_hook(lambda *_: calls.append(time.monotonic()))
    demo = build_demo(settings, engine)
    options = launch_options(settings, engine=engine)
    options.update(prevent_thread_lock=True, quiet=True)
    demo.launch(**options)
    try:
        yield f"http://127.0.0.1:{settings.port}/", calls
    finally:
        hook.remove()
        demo.close()


def chat(client: Client, question: str, submit: bool = False):
    call = client.submit if submit else client.predict
    return call(handle_file(PHOTO), question, decoding="greedy", max_new_tokens=LONG, api_name="/chat")


def settle(calls: list[float], quiet_s: float = 1.0, limit_s: float = 60.0) -> int:
    """Waits until no forward pass happened for `quiet_s`; returns how many there were."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        time.sleep(0.2)
        if not calls or time.monotonic() - calls[-1] > quiet_s:
            break
    return len(calls)


def test_a_cancelled_chat_stops_generating(counted_app):
    url, calls = counted_app
    client = Client(url, verbose=False)
    full = chat(client, "What is in the picture?")
    whole = settle(calls)
    assert whole >= 100, f"the answer should run long for this test to mean anything ({whole} passes)"
    assert full

    calls.clear()
    job = chat(client, "And what else is there?", submit=True)
    deadline = time.monotonic() + 60
    while len(calls) < 3 and time.monotonic() < deadline:  # the answer has started streaming
        time.sleep(0.05)
    job.cancel()
    cancelled = settle(calls)
    assert cancelled < whole // 2, f"{cancelled} forward passes after a cancel; a whole answer is {whole}"
