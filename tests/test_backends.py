"""Text backends: the mapping startup picks from, and a closed chat stream that stops generating.

A visitor who leaves (Gradio closes the handler's generator) must not leave the language model
writing the rest of a 400-token answer in a thread nobody reads. vLLM's side of the same:
tests/test_vllm_client.py::test_closing_the_chat_stream_closes_the_server_response.
"""

import threading

import pytest
import torch
from transformers import LogitsProcessor

from blip2_app.backends import BACKENDS, AnswerDone, AnswerSoFar, TextBackend
from blip2_app.backends import local as local_backend
from blip2_app.config import Settings
from blip2_app.errors import SettingsError
from blip2_app.generation import GenerationSettings

LONG = GenerationSettings(decoding="greedy", min_new_tokens=400, max_new_tokens=400, no_repeat_ngram_size=0)


def test_the_backend_flag_takes_the_mapping_names_and_the_local_one_fits_the_protocol(load_tiny):
    with pytest.raises(SettingsError, match="backend must be one of " + ", ".join(BACKENDS)):
        Settings(model="tiny-random", backend="no-such-backend")
    engine = load_tiny("tiny-random")
    assert isinstance(engine.text, TextBackend) and engine.text.name == "local"
    assert engine.text.report()["backend"] == "local" and engine.unsupported_knobs() == {}


def test_beam_search_chat_is_one_final_event(load_tiny, images):
    engine = load_tiny("tiny-random")
    beam = GenerationSettings(decoding="beam", num_beams=2, max_new_tokens=5)
    events = list(engine.chat_stream(images[0], "what is it?", generation=beam))
    expected = engine.chat(images[0], "what is it?", generation=beam)
    assert events == [AnswerDone(expected.text, expected.empty)]


def test_streamed_events_grow_and_end_with_the_whole_answer(load_tiny, images):
    engine = load_tiny("tiny-random")
    greedy = GenerationSettings(decoding="greedy", max_new_tokens=12)
    events = list(engine.chat_stream(images[1], "what is it?", generation=greedy))
    expected = engine.chat(images[1], "what is it?", generation=greedy)
    *partial, done = events
    assert done == AnswerDone(expected.text, expected.empty)
    assert all(isinstance(e, AnswerSoFar) for e in partial)
    assert all(expected.text.startswith(e.text) for e in partial)


def test_closing_the_local_stream_stops_generation_and_joins_its_thread(load_tiny, images, monkeypatch):
    engine = load_tiny("tiny-random")
    language_model = engine.text.loaded.model.language_model
    visible = engine.text.tokenizer("a", add_special_tokens=False).input_ids[0]

    class Always(LogitsProcessor):  # the same visible token every step: an answer 400 tokens long
        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, -float("inf"))
            forced[:, visible] = 0.0
            return forced

    original = language_model.generate
    monkeypatch.setattr(language_model, "generate", lambda **kw: original(**kw, logits_processor=[Always()]))
    stops: list[threading.Event] = []

    class RecordedEvent(threading.Event):
        def __init__(self):
            super().__init__()
            stops.append(self)

    monkeypatch.setattr(local_backend, "Event", RecordedEvent)
    forwards = []

    def count_and_hold(module, args, output):
        # The second token waits for the stop request (the consumer has the first by then): how far
        # generation gets after the consumer left depends on the stop signal, not on thread timing.
        forwards.append(1)
        if len(forwards) == 2:
            stops[0].wait(timeout=30)

    hook = language_model.register_forward_hook(count_and_hold)
    try:
        stream = engine.chat_stream(images[2], "what is it?", generation=LONG)
        assert isinstance(next(stream), AnswerSoFar)
        stream.close()
    finally:
        hook.remove()
    assert stops[0].is_set()
    assert len(forwards) == 2, "one token after the stop request at most, not 400"
    assert not [t for t in threading.enumerate() if t.name == "blip2-text-stream"]
