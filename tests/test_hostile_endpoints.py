"""Hostile images through every endpoint that takes one, and hostile parameters, over the real API.

The app runs as users start it (`python app.py --model tiny-random`); `gradio_client` uploads each
file of tests/data/hostile (see its MANIFEST.tsv) to /caption, /answer, /chat, /index_gallery and
/search_image. Each answer is either a result or a `gradio_client` AppError carrying one specific
sentence (never Gradio's generic "upstream ... exception" text nor our internal-error sentence),
and the server answers the next request.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

os.environ.setdefault("BLIP2_TINY_CACHE", tempfile.mkdtemp(prefix="blip2-tiny-"))

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from running_app import QueueAPI, running_app

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ROOT / "tests" / "data" / "hostile"
PHOTOS = [str(p) for p in sorted((ROOT / "assets" / "examples").glob("*.*"))[:2]]
MANIFEST = list(csv.DictReader((HOSTILE / "MANIFEST.tsv").open(), delimiter="\t"))

# The sentence each refused file must get (the same on every endpoint).
REFUSED = {
    "made_empty_0_bytes.png": "This file is empty.",
    "made_png_header_claims_100000x100000.png": "This image is too large: 100000 x 100000 pixels",
    "made_random_bytes.jpg": "This file is not a recognised image format.",
    "made_text_file_renamed.jpg": "This file is a text file, not an image.",
    "pillow_avif_hopper.heif": "This file is a HEIC/HEIF image, which we cannot read",
    "pillow_bmp_b_badheadersize.bmp": "not an image we can read (damaged BMP header)",
    "pillow_decompression_bomb.gif": "This image is too large: 4,364,696,535 pixels",
    "pillow_png_decompression_dos.png": "not an image we can read (oversized PNG metadata)",
    "pillow_truncated_image.png": "not an image we can read (truncated PNG)",
    "pillow_truncated_jpeg.jpg": "not an image we can read (truncated JPEG)",
}
GENERIC = ("upstream Gradio app has raised an exception", "internal error", "Traceback")
GREEDY = {"decoding": "greedy", "max_new_tokens": 3}


def test_manifest_is_covered():
    names = {row["filename"] for row in MANIFEST}
    assert names == {p.name for p in HOSTILE.iterdir() if p.name != "MANIFEST.tsv"}
    for row in MANIFEST:  # files the manifest says must be refused are in REFUSED
        if row["expected_behaviour"].startswith("reject") and " or accept" not in row["expected_behaviour"]:
            assert row["filename"] in REFUSED, row["filename"]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running_app(
        tmp_path_factory.mktemp("hostile"), ["--concurrency", "1", "--max-queue", "16"]
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(app) -> Client:
    client = Client(app.url, verbose=False)
    status = client.predict([handle_file(p) for p in PHOTOS], api_name="/index_gallery")
    assert status.startswith("Indexed 2 new images"), status
    return client


def outcome(call) -> tuple[str, object]:
    try:
        return "ok", call()
    except AppError as error:
        return "refused", str(error)


@pytest.mark.parametrize("name", sorted(row["filename"] for row in MANIFEST))
def test_hostile_file_through_every_image_endpoint(client, name):
    image = handle_file(str(HOSTILE / name))
    results = {
        "/caption": outcome(lambda: client.predict(image, "short", **GREEDY, api_name="/caption")),
        "/answer": outcome(lambda: client.predict(image, "What is it?", **GREEDY, api_name="/answer")),
        "/chat": outcome(lambda: client.predict(image, "What is it?", **GREEDY, api_name="/chat")),
        "/index_gallery": outcome(lambda: client.predict([image], api_name="/index_gallery")),
        "/search_image": outcome(lambda: client.predict(image, 3, api_name="/search_image")),
    }
    for endpoint, (kind, value) in results.items():
        if name in REFUSED:
            assert kind == "refused", (endpoint, value)
            assert REFUSED[name] in value, (endpoint, value)
        else:
            assert kind == "ok", (endpoint, value)
        assert not any(g in str(value) for g in GENERIC), (endpoint, value)
    if name not in REFUSED:
        assert isinstance(results["/caption"][1], str)
        assert [m["role"] for m in results["/chat"][1]][-2:] == ["user", "assistant"]
        assert results["/index_gallery"][1].startswith(("Indexed 1 new image", "Indexed 0 new images"))
        assert isinstance(results["/search_image"][1], list) and results["/search_image"][1]
    # ...and the server still serves the next request: the next file's five calls, then the test below.


def test_the_server_still_serves_after_every_hostile_file(client, app):
    assert app.process.poll() is None
    assert client.predict(handle_file(PHOTOS[0]), "short", **GREEDY, api_name="/caption")
    assert client.predict("a photo", 3, api_name="/search_text")


# --------------------------------------------------------------------------- hostile parameters
CAPTION_REFUSALS = [
    ({"num_beams": 0}, "num_beams must be between 1 and 10; got 0."),
    ({"num_beams": 1000}, "num_beams must be between 1 and 10; got 1000."),
    ({"decoding": "nucleus", "temperature": 0}, "temperature must be between 0.01 and 5; got 0."),
    ({"decoding": "nucleus", "temperature": -1}, "temperature must be between 0.01 and 5; got -1."),
    ({"decoding": "nucleus", "top_p": 0}, "top_p must be between 0.01 and 1; got 0."),
    ({"decoding": "nucleus", "top_p": 2}, "top_p must be between 0.01 and 1; got 2."),
    ({"max_new_tokens": 10**6}, "max_new_tokens must be between 1 and 512; got 1000000."),
    ({"min_new_tokens": 40, "max_new_tokens": 10}, "min_new_tokens (40) cannot exceed max_new_tokens (10)."),
    ({"num_captions": 10**6}, "num_captions must be between 1 and 10"),
    ({"num_captions": 6, "num_beams": 5}, "Beam search returns at most num_beams captions"),
    ({"repetition_penalty": -3}, "repetition_penalty must be between 0.5 and 3"),
    ({"no_repeat_ngram_size": 10**6}, "no_repeat_ngram_size must be between 0 and 10"),
    ({"seed": 2**40}, "seed must be between -1 and 4294967295"),
    ({"num_beams": 2.5}, "num_beams must be a whole number"),
]


@pytest.mark.parametrize(("changes", "sentence"), CAPTION_REFUSALS)
def test_hostile_generation_settings_are_refused_with_a_sentence(client, changes, sentence):
    with pytest.raises(AppError) as error:
        client.predict(
            handle_file(PHOTOS[0]), "short", **{"decoding": "beam", **changes}, api_name="/caption"
        )
    assert sentence in str(error.value)


def test_hostile_text_and_choices(client):
    photo = handle_file(PHOTOS[0])
    cases = [
        (lambda: client.predict(photo, "", api_name="/answer"), "The question is empty"),
        (lambda: client.predict(photo, "   \x00\x07  ", api_name="/answer"), "The question is empty"),
        (lambda: client.predict(photo, "why? " * 20_000, api_name="/answer"), "limit is 2,000 characters"),
        (lambda: client.predict(photo, "", api_name="/chat"), "The question is empty"),
        (lambda: client.predict(photo, "custom", "", api_name="/caption"), "The custom prompt is empty"),
        (lambda: client.predict(photo, "custom", "x" * 100_000, api_name="/caption"), "limit is 2,000"),
        (
            lambda: client.predict(photo, "", api_name="/caption"),
            "style must be one of short, detailed, custom",
        ),
        (lambda: client.predict(photo, "short", decoding="", api_name="/caption"), "decoding must be one of"),
        (
            lambda: client.predict(photo, "?", instruction="i" * 3000, api_name="/answer"),
            "instruction is 3,000",
        ),
        (lambda: client.predict("x" * 100_000, 3, api_name="/search_text"), "limit is 500 characters"),
        (lambda: client.predict("", 3, api_name="/search_text"), "The search text is empty"),
        (lambda: client.predict("cat", 10**6, api_name="/search_text"), "top_k must be between 1 and 30"),
        (lambda: client.predict("cat", 0, api_name="/search_text"), "top_k must be between 1 and 30"),
        (lambda: client.predict("cat", 3, True, 10**6, api_name="/search_text"), "rerank_k must be between"),
        (lambda: client.predict(photo, 10**6, api_name="/search_image"), "top_k must be between 1 and 30"),
        (
            lambda: client.predict(
                photo, "?", {"headers": ["question", "answer"], "data": [["q", "a"]] * 9}, api_name="/chat"
            ),
            "at most 8 few-shot examples",
        ),
        (
            lambda: client.predict(
                photo, "?", {"headers": ["question", "answer"], "data": [["", "orphan"]]}, api_name="/chat"
            ),
            "has an answer but no question",
        ),
    ]
    for call, sentence in cases:
        with pytest.raises(AppError) as error:
            call()
        assert sentence in str(error.value), (sentence, str(error.value))
    # Control characters are not an error: they become spaces.
    answer = client.predict(photo, "what\x00 is\x1b[31m this\u202e?", **GREEDY, api_name="/answer")
    assert isinstance(answer, str)


def test_values_gradio_client_cannot_send(app):
    """NaN, infinity, strings and nulls where numbers belong: a sentence naming the parameter."""
    api = QueueAPI(app.url)
    photo = {
        "path": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
    }
    for value, sentence in (
        (float("nan"), "num_beams must be a finite number"),
        (float("inf"), "num_beams must be a finite number"),
        ("ten", "num_beams must be a number; got 'ten'."),
        ([5], "num_beams must be a number"),
        (True, "num_beams must be a number"),
    ):
        result = api.call("caption", [photo, "short", "", "beam", value])
        assert not result["ok"] and sentence in result["error"], (value, result)
    result = api.call("caption", [photo, 42])
    assert not result["ok"] and "style must be one of short, detailed, custom; got 42." in result["error"]
    result = api.call("caption", [photo, "short", "", "greedy", 1, 1.0, 0.9, 1, 3, 1.0, 1.0, 3, 1, "seven"])
    assert not result["ok"] and "seed must be a number; got 'seven'." in result["error"], result
    assert api.call("caption", [photo, "short", "", "greedy", 1, 1.0, 0.9, 1, 3])["ok"]
