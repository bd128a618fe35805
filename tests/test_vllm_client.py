"""The vLLM backend against a scripted server (httpx.MockTransport): requests, replies, failures.

No vLLM needed: these check what the app sends (the local engine's prompt, the image's exact
pixels, the sampling fields) and that every failure gets its own sentence. The same backend
against a real vLLM server: tests/test_vllm_server.py.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tempfile
from collections.abc import Callable

os.environ.setdefault("BLIP2_TINY_CACHE", tempfile.mkdtemp(prefix="blip2-tiny-"))

import gradio as gr
import httpx
import numpy as np
import pytest
from PIL import Image

from blip2_app.backends import AnswerDone, AnswerSoFar
from blip2_app.backends.vllm import (
    BackendRequestError,
    BackendResponseError,
    BackendTimeoutError,
    BackendUnavailableError,
    UnsupportedDecodingError,
    VLLMOptions,
    check_supported,
    connect,
    sampling_params,
)
from blip2_app.config import Settings
from blip2_app.engine import Engine
from blip2_app.errors import ModelLoadError, SettingsError
from blip2_app.generation import GenerationSettings
from blip2_app.prompts import ChatTurn, caption_prompt, vqa_prompt
from blip2_app.registry import Registry
from blip2_app.ui.health import readiness
from blip2_app.ui.report import model_report_markdown
from blip2_app.ui.tabs.caption import CaptionHandlers
from blip2_app.ui.tabs.chat import ChatHandlers

URL = "http://vllm.test:8000/v1"
MODEL = "tiny-blip2"
Handler = Callable[[httpx.Request], httpx.Response]


class Script:
    """A fake vLLM: /health, /v1/models, and /v1/chat/completions answered by `reply`."""

    def __init__(self, reply: Handler | None = None):
        self.reply = reply or (lambda request: completion([[10, 11, 2]]))
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/health":
            return httpx.Response(200)
        if path == "/v1/models":
            return httpx.Response(
                200, json={"data": [{"id": MODEL, "root": "/models/tiny", "max_model_len": 512}]}
            )
        return self.reply(request)

    def bodies(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests if r.url.path.endswith("/chat/completions")]


def completion(rows: list[list[int]]) -> httpx.Response:
    choices = [
        {"index": i, "message": {"role": "assistant", "content": "x"}, "token_ids": r}
        for i, r in enumerate(rows)
    ]
    return httpx.Response(200, json={"choices": choices})


def sse(*pieces: list[int], done: bool = True) -> httpx.Response:
    """vLLM's stream with return_token_ids: each chunk carries its new token ids."""
    lines = [
        f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': '?'}, 'token_ids': p}]})}\n\n"
        for p in pieces
    ]
    if done:
        lines.append("data: [DONE]\n\n")
    return httpx.Response(200, content="".join(lines).encode(), headers={"content-type": "text/event-stream"})


@pytest.fixture(scope="module")
def entry():
    return Registry.load([]).resolve("tiny-random")


@pytest.fixture(scope="module")
def local(load_tiny):
    return load_tiny("tiny-random", retrieval_model="none")


def remote(entry, script: Script, **options) -> Engine:
    return Engine(connect(entry, VLLMOptions(URL, **options), transport=httpx.MockTransport(script)))


@pytest.fixture
def photo():
    return Image.fromarray((np.random.RandomState(3).rand(40, 48, 3) * 255).astype("uint8"))


# --------------------------------------------------------------------------- settings
def test_settings_need_a_url_for_vllm():
    with pytest.raises(SettingsError, match="--vllm-url"):
        Settings(model="tiny-random", backend="vllm")
    with pytest.raises(SettingsError, match="http"):
        Settings(model="tiny-random", backend="vllm", vllm_url="localhost:8000")
    with pytest.raises(SettingsError, match="backend must be one of local, vllm"):
        Settings(backend="remote")
    settings = Settings.from_sources(
        ["--backend", "vllm", "--vllm-url", URL],
        env={"BLIP2_VLLM_TIMEOUT_S": "7.5", "BLIP2_VLLM_RETRIES": "0"},
    )
    assert (settings.backend, settings.vllm_url, settings.vllm_timeout_s, settings.vllm_retries) == (
        "vllm",
        URL,
        7.5,
        0,
    )


# --------------------------------------------------------------------------- decoding knobs
def test_unsupported_knobs_are_refused_not_ignored():
    with pytest.raises(UnsupportedDecodingError, match="Beam search is not available"):
        check_supported(GenerationSettings(decoding="beam", no_repeat_ngram_size=0))
    with pytest.raises(UnsupportedDecodingError, match="no_repeat_ngram_size=3"):
        check_supported(GenerationSettings(decoding="greedy", no_repeat_ngram_size=3))
    check_supported(GenerationSettings(decoding="nucleus", no_repeat_ngram_size=0))


def test_sampling_params_map_the_supported_knobs():
    greedy = sampling_params(GenerationSettings(decoding="greedy", max_new_tokens=9, min_new_tokens=2))
    assert greedy == {
        "max_tokens": 9,
        "min_tokens": 2,
        "repetition_penalty": 1.0,
        "n": 1,
        "temperature": 0.0,
        "top_p": 1.0,
    }
    nucleus = sampling_params(
        GenerationSettings(
            decoding="nucleus", temperature=0.7, top_p=0.8, num_captions=3, seed=5, repetition_penalty=1.3
        )
    )
    assert nucleus["temperature"] == 0.7 and nucleus["top_p"] == 0.8 and nucleus["n"] == 3
    assert nucleus["seed"] == 5 and nucleus["repetition_penalty"] == 1.3


def test_defaults_become_what_the_server_can_run(entry):
    engine = remote(entry, Script())
    assert entry.decoding.decoding == "beam"  # the registry's default, for the local engine
    assert engine.default_generation().decoding == "greedy"
    assert engine.default_generation().no_repeat_ngram_size == 0
    assert engine.text.entry.answer_decoding.decoding == "greedy"
    assert set(engine.unsupported_knobs()) == {"beam", "num_beams", "length_penalty", "no_repeat_ngram_size"}


# --------------------------------------------------------------------------- what is sent
def test_caption_sends_the_local_prompt_and_the_exact_pixels(entry, local, photo):
    script = Script(lambda request: completion([[local.text.loaded.processor.tokenizer.eos_token_id]]))
    engine = remote(entry, script)
    engine.caption(photo, "detailed", generation=engine.default_generation())
    engine.answer(photo, "what is it?")
    caption_body, answer_body = script.bodies()
    content = caption_body["messages"][0]["content"]
    assert content[1] == {"type": "text", "text": caption_prompt(entry.templates, "detailed")}
    assert answer_body["messages"][0]["content"][1]["text"] == vqa_prompt(entry.templates, "what is it?")
    header, data = content[0]["image_url"]["url"].split(",", 1)
    assert header == "data:image/png;base64"
    sent = Image.open(io.BytesIO(base64.b64decode(data)))
    assert np.array_equal(np.asarray(sent), np.asarray(local.prepare(photo)[0].image))
    assert caption_body["model"] == MODEL and caption_body["add_special_tokens"] is True
    assert caption_body["temperature"] == 0.0 and caption_body["return_token_ids"] is True


def words(local, *texts: str) -> list[list[int]]:
    tokenizer = local.text.loaded.processor.tokenizer
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def test_chat_prompt_is_the_local_engines(entry, local, photo):
    script = Script(lambda request: sse(*words(local, "a", " cat")))
    engine = remote(entry, script)
    history = [ChatTurn("what is it?", "a cat")]
    generation = engine.default_generation().replace(decoding="nucleus", max_new_tokens=10)
    shown = list(engine.chat_stream(photo, "what colour?", history, generation=generation))
    assert shown == [AnswerSoFar("a"), AnswerSoFar("a cat"), AnswerDone("a cat")]
    expected = local.build_chat_prompt("what colour?", history, generation=generation).text
    body = script.bodies()[0]
    assert body["messages"][0]["content"][1]["text"] == expected and body["stream"] is True


def test_token_ids_are_decoded_like_the_local_engine(entry, local, photo):
    tokenizer = local.text.loaded.processor.tokenizer
    ids = [*tokenizer(" a red cat on a table").input_ids[1:], tokenizer.eos_token_id]
    engine = remote(entry, Script(lambda request: completion([ids, ids[:2]])))
    captions = engine.caption(
        photo, generation=GenerationSettings(decoding="nucleus", num_captions=2, no_repeat_ngram_size=0)
    )[0]
    assert [c.text for c in captions] == ["a red cat on a table", "a red"]
    assert captions[0].token_ids == tuple(ids)


# --------------------------------------------------------------------------- failures
def test_server_down_at_start_up_is_one_sentence(entry):
    def refuse(request):
        raise httpx.ConnectError("Connection refused", request=request)

    with pytest.raises(ModelLoadError, match=r"vLLM server at http://vllm.test:8000/v1 cannot be reached"):
        connect(entry, VLLMOptions(URL, retries=0), transport=httpx.MockTransport(refuse))


def test_app_refuses_to_start_when_the_server_is_down(capsys):
    """A real refused connection (a free port nobody listens on): one line, exit code 1."""
    from running_app import free_port

    import app

    url = f"http://127.0.0.1:{free_port()}/v1"
    argv = ["--model", "tiny-random", "--port", str(free_port()), "--backend", "vllm", "--vllm-url", url]
    assert app.main([*argv, "--vllm-retries", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("blip2-studio: Cannot use the vLLM backend: The vLLM server at " + url)
    assert "cannot be reached" in err


def test_connection_failures_are_retried_then_reported(entry, photo, monkeypatch):
    monkeypatch.setattr("blip2_app.backends.vllm.BACKOFF_S", 0.0)
    calls = []

    def flaky(request):
        calls.append(1)
        if len(calls) < 3:
            raise httpx.ConnectError("Connection refused", request=request)
        return completion([[10, 2]])

    engine = remote(entry, Script(flaky), retries=2)
    assert engine.caption(photo)[0][0].token_ids == (10, 2) and len(calls) == 3

    def down(request):
        raise httpx.ConnectError("Connection refused", request=request)

    engine = remote(entry, Script(down), retries=1)
    with pytest.raises(BackendUnavailableError, match="cannot be reached"):
        engine.caption(photo)


def test_server_busy_503_is_retried(entry, photo, monkeypatch):
    monkeypatch.setattr("blip2_app.backends.vllm.BACKOFF_S", 0.0)
    answers = iter([httpx.Response(503), completion([[12, 2]])])
    engine = remote(entry, Script(lambda request: next(answers)), retries=2)
    assert engine.caption(photo)[0][0].token_ids == (12, 2)


def test_slow_server_times_out_with_its_own_message(entry, photo):
    def slow(request):
        raise httpx.ReadTimeout("timed out", request=request)

    engine = remote(entry, Script(slow), timeout_s=3)
    with pytest.raises(BackendTimeoutError, match="sent nothing for 3 s"):
        engine.caption(photo)


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (lambda r: httpx.Response(200, content=b"<html>proxy</html>"), "not JSON"),
        (lambda r: httpx.Response(200, json={"choices": []}), "no choices"),
        (lambda r: httpx.Response(200, json={"choices": [{"message": {}}]}), "without token_ids"),
    ],
)
def test_malformed_replies_are_named(entry, photo, reply, match):
    engine = remote(entry, Script(reply))
    with pytest.raises(BackendResponseError, match=match):
        engine.caption(photo)


def test_server_refusal_carries_its_message(entry, photo):
    refusal = {"error": {"message": "This model's maximum context length is 64 tokens.", "code": 400}}
    engine = remote(entry, Script(lambda r: httpx.Response(400, json=refusal)))
    with pytest.raises(BackendRequestError, match="HTTP 400: This model's maximum context length is 64"):
        engine.caption(photo)
    template = {"error": {"message": "Cannot use chat template functions because no chat template is set"}}
    engine = remote(entry, Script(lambda r: httpx.Response(400, json=template)))
    with pytest.raises(BackendRequestError, match="--chat-template vllm_chat_template.jinja"):
        engine.caption(photo)


def test_stream_cut_mid_answer(entry, local, photo):
    engine = remote(entry, Script(lambda request: sse(*words(local, "a", " cat"), done=False)))
    generation = GenerationSettings(decoding="nucleus", no_repeat_ngram_size=0)
    stream = engine.chat_stream(photo, "what is it?", generation=generation)
    assert next(stream) == AnswerSoFar("a")
    with pytest.raises(BackendUnavailableError, match="closed the stream before the answer was complete"):
        list(stream)


class EndlessEvents(httpx.SyncByteStream):
    """A server stream of one token per event that never ends by itself; records what was read."""

    def __init__(self, ids: list[int]):
        self.ids, self.sent, self.closed = ids, 0, False

    def __iter__(self):
        while True:
            self.sent += 1
            event = {"choices": [{"index": 0, "delta": {"content": "?"}, "token_ids": self.ids}]}
            yield f"data: {json.dumps(event)}\n\n".encode()

    def close(self):
        self.closed = True


def test_closing_the_chat_stream_closes_the_server_response(entry, local, photo):
    events = EndlessEvents(words(local, "a")[0])

    def reply(request):
        return httpx.Response(200, stream=events, headers={"content-type": "text/event-stream"})

    engine = remote(entry, Script(reply))
    generation = GenerationSettings(decoding="nucleus", no_repeat_ngram_size=0, max_new_tokens=400)
    stream = engine.chat_stream(photo, "what is it?", generation=generation)
    assert next(stream) == AnswerSoFar("a")
    stream.close()
    assert events.closed and events.sent == 1


def test_stream_shows_a_character_once_its_bytes_are_complete(entry, local, photo):
    tokenizer = local.text.loaded.processor.tokenizer
    byte_tokens = tokenizer.convert_tokens_to_ids(list("Ã©"))  # "é" as two byte-level tokens
    assert tokenizer.decode(byte_tokens) == "é"
    engine = remote(entry, Script(lambda request: sse(*words(local, "a"), byte_tokens[:1], byte_tokens[1:])))
    generation = GenerationSettings(decoding="nucleus", no_repeat_ngram_size=0)
    assert list(engine.chat_stream(photo, "what is it?", generation=generation)) == [
        AnswerSoFar("a"),
        AnswerSoFar("aé"),
        AnswerDone("aé"),
    ]


def test_handlers_turn_backend_failures_into_specific_gradio_errors(entry, photo, tmp_path):
    def down(request):
        raise httpx.ConnectError("Connection refused", request=request)

    path = tmp_path / "photo.png"
    photo.save(path)
    settings = Settings(model="tiny-random", backend="vllm", vllm_url=URL, retrieval_model="none")
    captions = CaptionHandlers(remote(entry, Script()))
    with pytest.raises(gr.Error, match="Beam search is not available with the vLLM backend"):
        captions.caption(str(path), decoding="beam")
    with pytest.raises(gr.Error, match="no_repeat_ngram_size=2 is not supported"):
        captions.caption(str(path), decoding="greedy", no_repeat_ngram_size=2)
    chats = ChatHandlers(remote(entry, Script(down), retries=0), settings)
    with pytest.raises(gr.Error, match="cannot be reached"):
        list(chats.chat(str(path), "what is it?"))


def test_model_tab_shows_server_health(entry):
    script = Script()
    engine = remote(entry, script)
    settings = Settings(model="tiny-random", backend="vllm", vllm_url=URL)
    text = model_report_markdown(engine.info(), engine, settings)
    assert "on a vLLM server" in text and "✅ healthy" in text and f"`{MODEL}`" in text and " ms |" in text
    assert readiness(engine)["backend"] == "vllm" and readiness(engine)["device"] == f"vLLM server {URL}"

    def down(request):
        raise httpx.ConnectError("Connection refused", request=request)

    engine.text.client._http = httpx.Client(transport=httpx.MockTransport(down))
    text = model_report_markdown(engine.info(), engine, settings)
    assert "❌" in text and "cannot be reached" in text


def test_ui_shows_the_knobs_vllm_lacks_disabled_with_the_reason(entry):
    from blip2_app.ui import build_demo

    settings = Settings(model="tiny-random", backend="vllm", vllm_url=URL, retrieval_model="none")
    demo = build_demo(settings, remote(entry, Script()))
    blocks = list(demo.blocks.values())
    lacking = [
        b
        for b in blocks
        if isinstance(b, gr.Slider) and b.label in ("Beams", "Length penalty", "No-repeat n-gram size")
    ]
    # beams: caption, quick answer, batch; length penalty and n-gram size: caption, batch
    assert len(lacking) == 7
    assert all(b.interactive is False and "vLLM" in (b.info or "") for b in lacking)
    assert {b.value for b in lacking if b.label == "No-repeat n-gram size"} == {0}
    radios = [
        b for b in blocks if isinstance(b, gr.Radio) and b.label == "Decoding"
    ]  # caption, chat, answer, batch
    assert len(radios) == 4 and all("Beam search is not available" in (r.info or "") for r in radios)
    assert {r.value for r in radios} <= {"greedy", "nucleus"}
    others = [b for b in blocks if isinstance(b, gr.Slider) and b.label in ("Temperature", "Top-p")]
    assert others and all(b.interactive is not False for b in others)
