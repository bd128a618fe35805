"""Caption and answer requests that arrive together run as one engine batch (issue 20, point 2).

The batcher on its own first (threads, a fake engine call), then the app on the tiny model in this
process, so the language model's `generate` calls can be counted while gradio_client sessions
send at the same moment: the batches form, each session gets the result it gets alone, requests
with other decoding settings get theirs, and a bad request fails alone with its own sentence.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from running_app import free_port

from blip2_app.batching import Batcher, BatchLimits, TextBatcher, exact_batches
from blip2_app.config import Settings
from blip2_app.errors import SettingsError
from blip2_app.startup import load_engine
from blip2_app.ui.tabs.caption import CaptionHandlers
from blip2_app.ui.tabs.chat import ChatHandlers

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = [str(p) for p in sorted((ROOT / "assets" / "examples").glob("*.*"))[:5]]
RANDOM_BYTES = str(ROOT / "tests" / "data" / "hostile" / "made_random_bytes.jpg")
GREEDY = {"decoding": "greedy", "max_new_tokens": 8}
# Long enough that every request of a test joins the first batch (batches hold 5 requests, and a
# test sends at most 5 at once); a full batch runs at once.
WAIT_MS = 5000


# ----------------------------------------------------------------------------- the batcher alone
def at_once(batcher: Batcher, jobs: list) -> list:
    """Submits `jobs` from one thread each, released together; results or errors, in order."""
    start = threading.Barrier(len(jobs))

    def send(job):
        start.wait()
        try:
            return batcher.submit(job)
        except Exception as error:
            return error

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(send, jobs))


class Recorder:
    """A fake engine call: doubles numbers, refuses negative ones; remembers each call's jobs."""

    def __init__(self):
        self.calls: list[list[int]] = []

    def __call__(self, jobs: list[int]) -> list[int]:
        self.calls.append(list(jobs))
        if any(job < 0 for job in jobs):
            raise ValueError(f"negative: {min(jobs)}")
        return [2 * job for job in jobs]


def test_jobs_sent_together_run_as_one_call_and_each_gets_its_own_result():
    run = Recorder()
    batcher = Batcher(run, key=lambda job: "same", limits=BatchLimits(max_size=6, wait_s=1.0, max_wait_s=2.0))
    assert at_once(batcher, [1, 2, 3, 4, 5, 6]) == [2, 4, 6, 8, 10, 12]
    assert len(run.calls) == 1 and sorted(run.calls[0]) == [1, 2, 3, 4, 5, 6]
    assert list(batcher.history) == [(6, 1)]


def test_a_batch_holds_at_most_max_size_jobs():
    run = Recorder()
    batcher = Batcher(run, key=lambda job: "same", limits=BatchLimits(max_size=3, wait_s=1.0, max_wait_s=2.0))
    assert at_once(batcher, [1, 2, 3, 4, 5, 6, 7]) == [2, 4, 6, 8, 10, 12, 14]
    assert all(len(call) <= 3 for call in run.calls) and sum(map(len, run.calls)) == 7
    assert len(run.calls) >= 3


def test_incompatible_jobs_run_as_separate_calls():
    run = Recorder()
    # Numbers may share a call with those of the same remainder by 3.
    batcher = Batcher(
        run, key=lambda job: job % 3, limits=BatchLimits(max_size=6, wait_s=1.0, max_wait_s=2.0)
    )
    assert at_once(batcher, [1, 2, 3, 4, 5, 6]) == [2, 4, 6, 8, 10, 12]
    assert sorted(sorted(call) for call in run.calls) == [[1, 4], [2, 5], [3, 6]]
    assert list(batcher.history) == [(6, 3)]


def test_a_failing_job_fails_alone_and_its_batch_mates_get_their_results():
    run = Recorder()
    batcher = Batcher(run, key=lambda job: "same", limits=BatchLimits(max_size=4, wait_s=1.0, max_wait_s=2.0))
    results = at_once(batcher, [1, -7, 3, 4])
    assert results[0] == 2 and results[2:] == [6, 8]
    assert isinstance(results[1], ValueError) and str(results[1]) == "negative: -7"
    # The shared call failed, then each job ran alone.
    assert sorted(run.calls[0]) == [-7, 1, 3, 4] and sorted(run.calls[1:]) == [[-7], [1], [3], [4]]


def arriving(batcher, jobs, every_s):
    """Submit `jobs` from their own threads, one every `every_s` seconds; their results."""

    def send(index_job):
        index, job = index_job
        time.sleep(index * every_s)
        return batcher.submit(job)

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(send, enumerate(jobs)))


def test_a_batch_waits_while_requests_keep_arriving():
    """Five jobs 0.3 s apart, 1.2 s from first to last: each comes within the 0.5 s quiet wait of
    the one before, so all share one call (a wait counted from the first would have split them)."""
    run = Recorder()
    batcher = Batcher(run, key=lambda job: "same", limits=BatchLimits(max_size=8, wait_s=0.5, max_wait_s=5.0))
    assert arriving(batcher, [1, 2, 3, 4, 5], every_s=0.3) == [2, 4, 6, 8, 10]
    assert run.calls == [[1, 2, 3, 4, 5]]


def test_a_batch_starts_by_its_longest_wait_however_requests_keep_arriving():
    run = Recorder()
    batcher = Batcher(run, key=lambda job: "same", limits=BatchLimits(max_size=8, wait_s=0.5, max_wait_s=0.7))
    assert arriving(batcher, [1, 2, 3, 4, 5], every_s=0.3) == [2, 4, 6, 8, 10]
    assert len(run.calls) >= 2 and sorted(job for call in run.calls for job in call) == [1, 2, 3, 4, 5]
    assert run.calls[0][0] == 1 and 5 not in run.calls[0]


def test_a_lone_job_waits_no_longer_than_the_batch_wait():
    run = Recorder()
    batcher = Batcher(run, key=lambda job: "same", limits=BatchLimits(max_size=8, wait_s=0.0))
    assert batcher.submit(21) == 42 and run.calls == [[21]]


def test_batch_settings_are_validated():
    with pytest.raises(ValueError, match="max_size"):
        BatchLimits(max_size=0)
    with pytest.raises(ValueError, match="wait_s"):
        BatchLimits(wait_s=float("nan"))
    with pytest.raises(ValueError, match="max_wait_s"):
        BatchLimits(wait_s=0.2, max_wait_s=0.1)
    with pytest.raises(SettingsError, match="max_batch_size"):
        Settings(max_batch_size=0)
    with pytest.raises(SettingsError, match="batch_wait_ms"):
        Settings(batch_wait_ms=-1)
    with pytest.raises(SettingsError, match="batch_max_wait_ms"):
        Settings(batch_wait_ms=200, batch_max_wait_ms=100)


def test_batch_dependent_precisions_run_one_at_a_time(load_tiny):
    # fbgemm's dynamic int8 quantizes activations per batch: batching would change results.
    quantized = load_tiny("tiny-random", precision="dynamic-int8", retrieval_model="none")
    assert not exact_batches(quantized)
    assert not TextBatcher(quantized, BatchLimits()).batches
    assert TextBatcher(quantized, BatchLimits(), batch_quantized=True).batches
    assert exact_batches(load_tiny("tiny-random", retrieval_model="none"))  # fp32


def test_a_bf16_vision_encoder_takes_concurrent_images_in_one_batch(load_tiny, images):
    """The app's CPU default with AMX: vision bf16, Q-Former and language model dynamic-int8. The
    vision encoder runs once for the batch (a float precision: rows differ from their own alone by
    rounding at most, kernels being chosen by row count); the Q-Former, whose int8 activations take
    one scale per call, reads each image alone."""
    engine = load_tiny(
        "tiny-random",
        precision="dynamic-int8",
        vision_precision="bf16",
        retrieval_model="none",
        cache_entries=0,
    )
    backend, model = engine.text, engine.text.loaded.model
    vision_rows, qformer_rows = [], []
    hooks = [
        model.vision_model.register_forward_hook(
            lambda m, a, k, out: vision_rows.append(out[0].shape[0]), with_kwargs=True
        ),
        model.qformer.register_forward_hook(
            lambda m, a, k, out: qformer_rows.append(out[0].shape[0]), with_kwargs=True
        ),
    ]
    try:
        prepared = engine.prepare(images[:3])
        together = backend._language_inputs(prepared, [""] * 3)
        assert vision_rows == [3] and qformer_rows == [1, 1, 1]
        alone = torch.cat([backend._language_inputs([p], [""]) for p in prepared])
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(together, alone, rtol=0.02, atol=0.02)  # bf16 rounding


# ----------------------------------------------------------------------------- through the app
@pytest.fixture(scope="module")
def counted_app():
    """The app on tiny-random (fp32) in this process; yields (url, engine, generate batch sizes)."""
    from blip2_app.ui import build_demo, launch_options

    settings = Settings(
        model="tiny-random",
        port=free_port(),
        max_batch_size=5,
        batch_wait_ms=WAIT_MS,
        batch_max_wait_ms=WAIT_MS,
        cache_entries=0,
    )
    engine = load_engine(settings)
    language_model = engine.text.loaded.model.language_model
    sizes: list[int] = []
    original = language_model.generate

    def counted(*args, **kwargs):
        sizes.append(kwargs["inputs_embeds"].shape[0])
        return original(*args, **kwargs)

    language_model.generate = counted
    demo = build_demo(settings, engine)
    options = launch_options(settings, engine=engine)
    options.update(prevent_thread_lock=True, quiet=True)
    demo.launch(**options)
    try:
        yield f"http://127.0.0.1:{settings.port}/", engine, sizes
    finally:
        del language_model.generate
        demo.close()


def sessions_at_once(url: str, calls: list[tuple[tuple, dict]]) -> list:
    """Each call from its own gradio_client session, all sent together; results or AppErrors."""
    clients = [Client(url, verbose=False) for _ in calls]
    start = threading.Barrier(len(calls))

    def send(index: int):
        args, kwargs = calls[index]
        start.wait()
        try:
            return clients[index].predict(*args, **kwargs)
        except AppError as error:
            return error

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(send, range(len(calls))))


def alone_caption(engine, photo: str, style: str = "short", **knobs) -> str:
    """What /caption answers for this request on its own (the same handler, no batching)."""
    return CaptionHandlers(engine).caption(photo, style, **knobs)


def test_concurrent_captions_run_as_one_batch_each_with_its_own_caption(counted_app):
    url, engine, sizes = counted_app
    sizes.clear()
    calls = [((handle_file(photo), "short"), {**GREEDY, "api_name": "/caption"}) for photo in PHOTOS]
    captions = sessions_at_once(url, calls)
    assert sizes == [5], f"language model generate calls (batch sizes): {sizes}"
    assert captions == [alone_caption(engine, photo, **GREEDY) for photo in PHOTOS]
    assert len(set(captions)) > 1  # the tiny model does read the image: a mix-up would show


def test_answers_with_different_questions_share_a_batch(counted_app):
    url, engine, sizes = counted_app
    questions = ["what?", "what colour is the big cat on the left of the sofa?", "why?", "who", "is it red?"]
    sizes.clear()
    calls = [
        ((handle_file(photo), question), {"decoding": "beam", "num_beams": 2, "api_name": "/answer"})
        for photo, question in zip(PHOTOS, questions, strict=True)
    ]
    answers = sessions_at_once(url, calls)
    assert sizes == [5], f"language model generate calls (batch sizes): {sizes}"
    handlers = ChatHandlers(engine, Settings(model="tiny-random"))
    expected = [
        handlers.answer(photo, question, decoding="beam", num_beams=2)
        for photo, question in zip(PHOTOS, questions, strict=True)
    ]
    assert answers == expected


def test_incompatible_settings_in_one_batch_each_get_their_own_result(counted_app):
    url, engine, sizes = counted_app
    requests = [
        ("short", GREEDY),
        # Another prompt, and knobs greedy search ignores: the same engine call.
        ("detailed", {**GREEDY, "seed": 5, "top_p": 0.5}),
        ("short", {"decoding": "greedy", "max_new_tokens": 5}),
        ("short", {"decoding": "beam", "num_beams": 2, "max_new_tokens": 8}),
        # Sampling runs alone (one random stream per call), in its turn within the batch.
        ("short", {"decoding": "nucleus", "seed": 3, "max_new_tokens": 8}),
    ]
    sizes.clear()
    calls = [
        ((handle_file(photo), style), {**knobs, "api_name": "/caption"})
        for photo, (style, knobs) in zip(PHOTOS, requests, strict=True)
    ]
    captions = sessions_at_once(url, calls)
    assert sorted(sizes) == [1, 1, 1, 2], f"language model generate calls (batch sizes): {sizes}"
    expected = [
        alone_caption(engine, photo, style, **knobs)
        for photo, (style, knobs) in zip(PHOTOS, requests, strict=True)
    ]
    assert captions == expected


def test_a_bad_request_fails_alone_with_its_own_sentence(counted_app):
    url, engine, sizes = counted_app
    sizes.clear()
    calls = [
        ((handle_file(PHOTOS[0]), "short"), {**GREEDY, "api_name": "/caption"}),
        ((handle_file(RANDOM_BYTES), "short"), {**GREEDY, "api_name": "/caption"}),
        ((handle_file(PHOTOS[1]), "sonnet"), {**GREEDY, "api_name": "/caption"}),  # Gradio's own check
        # Within the 2,000 characters a question may have, more tokens than the tiny model holds.
        ((handle_file(PHOTOS[2]), "why? " * 398), {**GREEDY, "api_name": "/answer"}),
    ]
    first, random_bytes, sonnet, too_long = sessions_at_once(url, calls)
    assert sizes == [1]  # the good request ran, once
    assert first == alone_caption(engine, PHOTOS[0], **GREEDY)
    assert isinstance(random_bytes, AppError) and "not a recognised image" in str(random_bytes)
    assert isinstance(sonnet, AppError) and "sonnet" in str(sonnet)
    assert isinstance(too_long, AppError) and "prompt is too long for this model" in str(too_long)
