"""UI handlers with the tiny engine, no browser: outputs, error paths, per-session state."""

from __future__ import annotations

import html
import inspect
import logging
import os
import tempfile
from pathlib import Path

os.environ.setdefault("BLIP2_TINY_CACHE", tempfile.mkdtemp(prefix="blip2-tiny-"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr
import pytest
import torch
from gradio.data_classes import FileData, ListFiles

from blip2_app.config import Settings
from blip2_app.errors import InvalidRequestError
from blip2_app.generation import GenerationSettings
from blip2_app.images import ImageDecodeError
from blip2_app.prompts import BuiltPrompt, ChatTurn
from blip2_app.startup import load_engine
from blip2_app.ui import errors as E
from blip2_app.ui.components import image_files, safe_image
from blip2_app.ui.decoding import DecodingInputs
from blip2_app.ui.sessions import ChatSession, GallerySession
from blip2_app.ui.tabs import retrieval as R
from blip2_app.ui.tabs.caption import CaptionHandlers
from blip2_app.ui.tabs.chat import ChatHandlers, parse_exemplars
from blip2_app.ui.tabs.model import ModelHandlers
from blip2_app.ui.tabs.retrieval import RetrievalHandlers

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = sorted((ROOT / "assets" / "examples").glob("*.*"))[:3]
HOSTILE = ROOT / "tests" / "data" / "hostile"
GREEDY = {"decoding": "greedy", "max_new_tokens": 8}


SETTINGS = Settings(model="tiny-random")


@pytest.fixture(scope="module")
def engine():
    return load_engine(SETTINGS)


@pytest.fixture(scope="module")
def captions(engine) -> CaptionHandlers:
    return CaptionHandlers(engine)


@pytest.fixture(scope="module")
def chats(engine) -> ChatHandlers:
    return ChatHandlers(engine, SETTINGS)


@pytest.fixture(scope="module")
def galleries(engine) -> RetrievalHandlers:
    return RetrievalHandlers(engine, SETTINGS)


@pytest.fixture(scope="module")
def photo() -> str:
    assert len(PHOTOS) == 3, "assets/examples must hold at least three photos"
    return str(PHOTOS[0])


def drain(stream):
    """All (messages, session) pairs a streaming handler yields."""
    return list(stream)


def error_text(excinfo: pytest.ExceptionInfo) -> str:
    return str(excinfo.value.message)


# --------------------------------------------------------------------------- caption
def test_caption_one_line_per_caption(captions, photo):
    one = captions.caption(photo, "short", max_new_tokens=6)
    assert isinstance(one, str) and one and "\n" not in one
    three = captions.caption(
        photo, "detailed", decoding="beam", num_beams=3, num_captions=3, max_new_tokens=6
    )
    assert len(three.split("\n")) == 3


def test_caption_custom_prompt_and_sampling(captions, photo):
    text = captions.caption(
        photo, "custom", "A photo of", decoding="nucleus", num_captions=2, seed=7, max_new_tokens=5
    )
    assert len(text.split("\n")) == 2
    again = captions.caption(
        photo, "custom", "A photo of", decoding="nucleus", num_captions=2, seed=7, max_new_tokens=5
    )
    assert again == text  # the seed makes sampling repeatable


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"style": "custom", "prompt": "   "}, "custom prompt is empty"),
        ({"style": "poem"}, "Caption style must be one of"),
        ({"num_beams": 100}, "num_beams must be between 1 and 10"),
        ({"decoding": "beam", "num_beams": 2, "num_captions": 3}, "at most num_beams captions"),
        ({"decoding": "telepathy"}, "Decoding must be one of"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"min_new_tokens": 20, "max_new_tokens": 5}, "cannot exceed max_new_tokens"),
        ({"seed": -2}, "seed must be between"),
        ({"seed": 1.5}, "seed must be a whole number"),
        ({"style": "custom", "prompt": "x" * 5_000_000}, "the limit is 2,000 characters"),
        ({"prompt": 42}, "custom prompt must be text"),
    ],
)
def test_caption_bad_requests_get_their_own_sentence(captions, photo, kwargs, expected):
    args = {"style": "short", **kwargs}
    with pytest.raises(gr.Error) as excinfo:
        captions.caption(photo, **args)
    assert expected in error_text(excinfo)


def test_decoding_inputs_change_only_what_was_set():
    base = GenerationSettings(decoding="beam", num_beams=4, max_new_tokens=20, seed=3)
    assert DecodingInputs().settings(base) == base
    changed = DecodingInputs(decoding="nucleus", max_new_tokens=7.0, seed=-1).settings(base)
    assert changed == GenerationSettings(decoding="nucleus", num_beams=4, max_new_tokens=7, seed=None)
    assert isinstance(changed.max_new_tokens, int)
    assert DecodingInputs(seed=5.0).settings(base).seed == 5
    with pytest.raises(InvalidRequestError, match="num_beams must be between 1 and 10"):
        DecodingInputs(num_beams=11).settings(base)
    with pytest.raises(InvalidRequestError, match="seed must be a whole number"):
        DecodingInputs(seed=0.5).settings(base)


def test_missing_image_is_a_user_error(captions):
    for empty in (None, "", "  "):
        with pytest.raises(gr.Error, match="Please add an image first"):
            captions.caption(empty, "short")


@pytest.mark.parametrize(
    "name",
    [
        "made_random_bytes.jpg",
        "made_empty_0_bytes.png",
        "made_text_file_renamed.jpg",
        "made_png_header_claims_100000x100000.png",
        "pillow_decompression_bomb.gif",
        "pillow_truncated_jpeg.jpg",
    ],
)
def test_hostile_files_get_the_decoder_sentence(captions, engine, name):
    path = str(HOSTILE / name)
    with pytest.raises(ImageDecodeError) as decoder:
        engine.prepare(path)
    with pytest.raises(gr.Error) as excinfo:
        captions.caption(path, "short")
    assert error_text(excinfo) == html.escape(str(decoder.value), quote=False)
    assert "internal error" not in error_text(excinfo)


def test_unexpected_errors_are_logged_not_shown(captions, engine, photo, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("secret stack detail")

    monkeypatch.setattr(engine, "caption", broken)
    with caplog.at_level(logging.ERROR, logger="blip2_app.ui.errors"), pytest.raises(gr.Error) as excinfo:
        captions.caption(photo, "short")
    assert error_text(excinfo) == E.INTERNAL_ERROR.format(what="writing captions")
    assert "secret" not in error_text(excinfo)
    assert any("secret stack detail" in (r.exc_text or "") for r in caplog.records), (
        "traceback must be logged"
    )


def test_out_of_memory_has_its_own_message(chats, engine, photo, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(engine, "answer", oom)
    with pytest.raises(gr.Error) as excinfo:
        chats.answer(photo, "what is it?")
    assert "ran out of memory" in error_text(excinfo)


def test_error_text_is_html_escaped(captions, photo):
    with pytest.raises(gr.Error) as excinfo:
        captions.caption(photo, "<b>bold</b>")
    assert "<b>" not in error_text(excinfo) and "&lt;b&gt;" in error_text(excinfo)


# --------------------------------------------------------------------------- answer
def test_answer_is_one_line_of_text(chats, photo):
    text = chats.answer(photo, "What is in the picture?", True, "", "beam", 2, 6)
    assert isinstance(text, str) and text and "\n" not in text
    assert chats.answer(photo, "What is in the picture?", False, decoding="greedy", max_new_tokens=4)


def test_answer_errors(chats, photo):
    with pytest.raises(gr.Error, match="question is empty"):
        chats.answer(photo, "  ")
    with pytest.raises(gr.Error, match="limit is 2,000 characters"):
        chats.answer(photo, "why " * 2000)
    with pytest.raises(gr.Error, match="short_answer must be true or false"):
        chats.answer(photo, "why?", short_answer="yes")
    with pytest.raises(gr.Error, match="question must be text"):
        chats.answer(photo, ["why?"])
    with pytest.raises(gr.Error, match="takes one image"):
        chats.answer([photo, photo], "why?")


# --------------------------------------------------------------------------- chat
def test_chat_streams_and_keeps_history_per_session(chats, photo):
    steps = drain(chats.chat(photo, "What is this?", None, "", **GREEDY, session=None))
    assert len(steps) >= 3, "the user's message first, then the growing answer"
    first_messages, _ = steps[0]
    assert first_messages == [{"role": "user", "content": "What is this?"}]
    answers = [m[-1]["content"] for m, _ in steps[1:] if m[-1]["role"] == "assistant"]
    assert answers and all(a.strip() for a in answers)
    messages, session = steps[-1]
    assert isinstance(session, ChatSession) and len(session.turns) == 1
    assert [m["role"] for m in messages] == ["user", "assistant"]

    # Second turn: the first one is context (shown again, and passed to the model).
    messages2, session2 = drain(chats.chat(photo, "And the colour?", None, "", **GREEDY, session=session))[-1]
    assert [m["content"] for m in messages2[::2]] == ["What is this?", "And the colour?"]
    assert len(session2.turns) == 2
    assert len(session.turns) == 1, "the earlier session object is not mutated"

    # Another visitor starts from nothing.
    other = drain(chats.chat(photo, "Hello?", None, "", **GREEDY, session=None))[-1][1]
    assert [t.question for t in other.turns] == ["Hello?"]


def test_chat_history_reaches_the_prompt(chats, engine, photo, monkeypatch):
    seen = {}
    original = engine.chat_stream

    def spy(image, question, history, exemplars, instruction, generation, **rest):
        seen["history"], seen["exemplars"] = list(history), list(exemplars)
        yield from original(image, question, history, exemplars, instruction, generation, **rest)

    monkeypatch.setattr(engine, "chat_stream", spy)
    session = ChatSession()
    session = drain(chats.chat(photo, "first?", None, "", **GREEDY, session=session))[-1][1]
    table = [["Is it red?", "yes"], ["", ""]]
    drain(chats.chat(photo, "second?", table, "", **GREEDY, session=session))
    assert [t.question for t in seen["history"]] == ["first?"]
    assert seen["exemplars"] == [ChatTurn("Is it red?", "yes")]


def test_new_image_starts_a_new_conversation(chats):
    first, second = str(PHOTOS[0]), str(PHOTOS[1])
    session = drain(chats.chat(first, "What is this?", None, "", **GREEDY))[-1][1]
    messages, fresh = drain(chats.chat(second, "And now?", None, "", **GREEDY, session=session))[-1]
    assert [t.question for t in fresh.turns] == ["And now?"]
    assert messages[0]["content"] == "And now?"
    assert chats.new_conversation() == ([], ChatSession())


def test_regenerate_replaces_the_last_answer(chats, photo):
    session = drain(chats.chat(photo, "one?", None, "", **GREEDY))[-1][1]
    session = drain(chats.chat(photo, "two?", None, "", **GREEDY, session=session))[-1][1]
    messages, again = drain(chats.regenerate(photo, None, "", **GREEDY, session=session))[-1]
    assert [t.question for t in again.turns] == ["one?", "two?"]
    assert len(messages) == 4
    with pytest.raises(gr.Error, match="no answer to regenerate"):
        drain(chats.regenerate(photo, None, "", session=ChatSession()))


def test_dropped_context_is_a_warning(chats, engine, photo, monkeypatch):
    monkeypatch.setattr(
        engine,
        "build_chat_prompt",
        lambda *a, **k: BuiltPrompt("x", dropped_turns=2, dropped_exemplars=1),
    )
    with pytest.warns(UserWarning) as record:
        drain(chats.chat(photo, "What is this?", None, "", **GREEDY))
    texts = " ".join(str(w.message) for w in record)
    assert "2 oldest chat turn(s)" in texts and "1 few-shot example(s)" in texts


def test_chat_errors(chats, photo):
    with pytest.raises(gr.Error, match="question is empty"):
        drain(chats.chat(photo, "", None, ""))
    with pytest.raises(gr.Error, match="Please add an image"):
        drain(chats.chat(None, "hi", None, ""))
    with pytest.raises(gr.Error, match="answer but no question"):
        drain(chats.chat(photo, "hi", [["", "orphan answer"]], ""))
    with pytest.raises(gr.Error, match="max_new_tokens must be between"):
        drain(chats.chat(photo, "hi", None, "", max_new_tokens=10_000))
    assert inspect.isgeneratorfunction(ChatHandlers.chat), "Gradio streams only generator functions"


def test_parse_exemplars_accepts_every_dataframe_form():
    import pandas as pd

    expected = [ChatTurn("Q1?", "A1"), ChatTurn("Q2?", "")]
    rows = [["Q1?", "A1"], ["", ""], ["Q2?", None]]
    assert parse_exemplars(rows) == expected
    assert parse_exemplars({"headers": ["question", "answer"], "data": rows}) == expected
    assert parse_exemplars(pd.DataFrame(rows, columns=["question", "answer"])) == expected
    assert parse_exemplars(None) == []
    with pytest.raises(ValueError, match="at most 8 few-shot examples"):
        parse_exemplars([[f"q{i}?", "a"] for i in range(9)])
    with pytest.raises(ValueError, match="rows"):
        parse_exemplars([["", ""]] * 1000)
    with pytest.raises(ValueError, match="pair"):
        parse_exemplars(["not a row"])


def test_show_question_clears_the_box_and_shows_the_message():
    session = ChatSession("h", [ChatTurn("a?", "b")])
    box, pending, shown = ChatHandlers.show_question("  next?  ", session)
    assert box == "" and pending == "  next?  "
    assert shown[-1] == {"role": "user", "content": "next?"} and len(shown) == 3


# --------------------------------------------------------------------------- gallery
def test_index_search_and_clear(galleries):
    status, gallery = galleries.index_gallery([str(p) for p in PHOTOS], False, None)
    assert status.startswith("Indexed 3 new images") and len(gallery) == 3

    hits = galleries.search_text("a photo", 2, False, 10, gallery)
    assert len(hits) == 2
    for rank, (image, caption) in enumerate(hits, start=1):
        assert image.size[0] > 0
        assert caption.startswith(f"#{rank} ") and "cosine" in caption and " p " in caption

    reranked = galleries.search_text("a photo", 3, True, 3, gallery)
    assert all("ITM" in caption for _, caption in reranked)

    long_query = " ".join(["a red bicycle leaning on a wall"] * 10)  # 500 characters at most, > 35 tokens
    with pytest.warns(
        UserWarning, match=r"Only the first 35 tokens of the search text are read.*last \d+ were"
    ):
        assert len(galleries.search_text(long_query, 2, False, 10, gallery)) == 2

    similar = galleries.search_image(str(PHOTOS[0]), 5, gallery)
    assert len(similar) == 2, "the query image itself is left out"
    assert all(PHOTOS[0].name not in caption for _, caption in similar)

    again, gallery = galleries.index_gallery([str(PHOTOS[0])], False, gallery)
    assert "Indexed 0 new images" in again and "Skipped 1 already in the gallery" in again

    preview = galleries.gallery_preview(gallery)
    assert [name for _, name in preview] == [p.name for p in PHOTOS]

    status, cleared = galleries.clear_gallery(gallery)
    assert status == "Cleared the gallery (3 images)." and len(cleared) == 0
    assert galleries.clear_gallery(cleared)[0] == "The gallery is already empty."
    with pytest.raises(gr.Error, match="gallery is empty"):
        galleries.search_text("a photo", 3, False, 3, cleared)


def test_galleries_are_per_session(galleries):
    _, alice = galleries.index_gallery([str(PHOTOS[0]), str(PHOTOS[1])], False, None)
    _, bob = galleries.index_gallery([str(PHOTOS[2])], False, None)
    assert len(alice) == 2 and len(bob) == 1
    names = [caption for _, caption in galleries.search_text("anything", 10, False, 10, bob)]
    assert len(names) == 1 and PHOTOS[2].name in names[0]
    with pytest.raises(gr.Error, match="gallery is empty"):
        galleries.search_image(str(PHOTOS[0]), 3, GallerySession())


def test_index_with_captions(galleries):
    status, gallery = galleries.index_gallery([str(PHOTOS[0])], True, None)
    assert status.startswith("Indexed 1 new image;")
    ((_, caption),) = galleries.search_text("x", 1, False, 1, gallery)
    assert caption.count("·") >= 3, "the generated caption follows the scores"


def test_unreadable_files_are_skipped_with_a_warning(galleries):
    files = [str(PHOTOS[0]), str(HOSTILE / "made_random_bytes.jpg")]
    with pytest.warns(UserWarning, match=r"Skipped made_random_bytes\.jpg: \w+"):
        status, gallery = galleries.index_gallery(files, False, None)
    assert "Indexed 1 new image" in status and "Could not read 1 file" in status and len(gallery) == 1
    with pytest.raises(gr.Error, match=r"None of the 2 files could be read as an image\. made_empty_0_bytes"):
        galleries.index_gallery(
            [str(HOSTILE / "made_empty_0_bytes.png"), str(HOSTILE / "made_text_file_renamed.jpg")],
            False,
            None,
        )


def test_gallery_limits(galleries, monkeypatch):
    with pytest.raises(gr.Error, match="choose one or more images"):
        galleries.index_gallery([], False, None)
    with pytest.raises(gr.Error, match="index at most"):
        galleries.index_gallery([str(PHOTOS[0])] * (R.MAX_FILES_PER_REQUEST + 1), False, None)
    _, gallery = galleries.index_gallery([str(PHOTOS[0])], False, None)
    with pytest.raises(gr.Error, match="top_k must be between 1 and 30"):
        galleries.search_text("x", 0, False, 3, gallery)
    with pytest.raises(gr.Error, match="top_k must be a whole number"):
        galleries.search_text("x", 2.5, False, 3, gallery)
    with pytest.raises(gr.Error, match="limit is 500 characters"):
        galleries.search_text("x" * 501, 3, False, 3, gallery)
    with pytest.raises(gr.Error, match="search text is empty"):
        galleries.search_text("   ", 3, False, 3, gallery)
    monkeypatch.setattr("blip2_app.ui.sessions.MAX_GALLERY_IMAGES", 2)
    with pytest.warns(UserWarning, match="at most"):
        status, gallery = galleries.index_gallery([str(p) for p in PHOTOS], False, gallery)
    assert len(gallery) == 2 and "not added: the gallery is full" in status
    with pytest.raises(gr.Error, match="gallery is full"):
        galleries.index_gallery([str(PHOTOS[2])], False, gallery)


# --------------------------------------------------------------------------- model tab, widgets
def test_model_report_tells_what_is_loaded(engine):
    text = ModelHandlers(engine, SETTINGS).model_report()
    for expected in (
        "tiny-random",
        "tiny-random-itm",
        "cpu",
        "float32",
        "Vision encoder",
        "Language model",
        "holds at most",
    ):
        assert expected in text


def test_model_report_does_not_tell_whether_an_image_was_seen(engine, images):
    # The cache's live counters are shared by all visitors: re-sending someone's image and
    # watching hits go up would show it was processed recently (threat model, finding 10).
    before = ModelHandlers(engine, SETTINGS).model_report()
    engine.image_features([images[0]])
    engine.image_features([images[0]])
    assert ModelHandlers(engine, SETTINGS).model_report() == before


def test_safe_widgets_do_not_decode_uploads():
    hostile = str(HOSTILE / "made_random_bytes.jpg")
    image = safe_image()
    assert image.preprocess(FileData(path=hostile)) == hostile
    assert image.preprocess(None) is None
    data_url = "data:image/png;base64,AAAA"
    assert image.preprocess(FileData(path="", url=data_url)) == data_url
    weird = str(HOSTILE / "pillow_sugarshack.mpo")  # an extension Gradio's check would refuse
    files = image_files(file_types=["image"])
    assert files.preprocess(ListFiles(root=[FileData(path=weird)])) == [weird]
    assert image.get_block_name() == "image" and files.get_block_name() == "file"


def test_chat_shows_tag_like_text_literally(chats, photo):
    messages = drain(chats.chat(photo, "is <s>this</s> a cat?", None, "", **GREEDY))[-1][0]
    assert messages[0]["content"] == "is &lt;s>this&lt;/s> a cat?"
    assert "<" not in "".join(m["content"] for m in messages).replace("&lt;", "")


def test_seed_minus_one_means_random(captions, photo):
    assert captions.caption(photo, "short", decoding="nucleus", seed=-1, max_new_tokens=4)


# --------------------------------------------------------------------------- wiring, launch
PUBLIC = {"caption", "answer", "chat", "index_gallery", "search_text", "search_image", "clear_gallery"}
# Issue 18: the new controls' endpoints; those doing no model work stay out of the model group.
PUBLIC |= {"answer_topk", "chat_edit", "more_like_this", "search_caption", "search_combined", "load_gallery"}
PUBLIC |= {"caption_batch", "match", "explain", "classify"}  # issue 17: the Batch and Explain tabs
PUBLIC |= {"search_images"}  # issue 18: the stateless gallery search (API-only, an MCP tool)
NO_MODEL_WORK = {"chat_undo", "chat_export", "set_min_score", "results_json", "download_gallery"}
PUBLIC |= NO_MODEL_WORK
BATCHED = {"caption", "answer"}  # issue 20: requests that arrive together run as one batch


def test_demo_wiring_follows_the_contract(engine):
    from blip2_app.ui import build_demo

    settings = Settings(model="tiny-random", concurrency=2, max_queue=5, max_batch_size=6)
    demo = build_demo(settings, engine)
    fns = list(demo.fns.values())
    public = {fn.api_name: fn for fn in fns if fn.api_visibility == "public"}
    assert set(public) == PUBLIC
    for name, fn in public.items():
        assert fn.queue, name
        if name in BATCHED:  # up to --max-batch-size wait together, to run as one batch
            assert (fn.concurrency_id, fn.concurrency_limit) == ("model-batched", 6), name
        elif name != "clear_gallery" and name not in NO_MODEL_WORK:  # model events share one limit
            assert (fn.concurrency_id, fn.concurrency_limit) == ("model", 2), name
    private = [fn for fn in fns if fn.api_visibility != "public"]
    assert all(fn.api_visibility == "private" for fn in private)
    # UI-only helpers skip the queue, except the thumbnail previews (UI_QUEUED: one at a time in
    # their own group); the only private model event is "Regenerate".
    queued = [fn for fn in private if fn.queue]
    assert {fn.api_name for fn in queued if fn.concurrency_id != "ui-work"} == {"regenerate"}
    assert all(
        (fn.concurrency_id, fn.concurrency_limit) == ("model", 2)
        for fn in queued
        if fn.api_name == "regenerate"
    )
    previews = [fn for fn in queued if fn.concurrency_id == "ui-work"]
    # and the Draw tabs' first step (the drawing decoded into the image input, tabs/drawing.py)
    assert previews and all(fn.api_name.startswith(("gallery_preview", "use_drawing")) for fn in previews)
    assert sum(fn.api_name.startswith("use_drawing") for fn in previews) == 6  # caption + 5 chat buttons
    assert all(fn.concurrency_limit == 1 for fn in previews)
    assert demo._queue.max_size == 5 and demo.api_open is False
    assert demo.delete_cache is not None


def test_launch_options_are_safe_by_default():
    from blip2_app.ui import launch_options

    options = launch_options(Settings(model="tiny-random", max_upload_mb=3))
    assert (
        options["server_name"] == "127.0.0.1" and options["server_port"] == 7860 and options["share"] is False
    )
    assert options["max_file_size"] == 3 * 1024 * 1024
    assert (
        options["enable_monitoring"] is False
        and options["ssr_mode"] is False
        and options["show_error"] is False
    )
    assert launch_options(Settings(model="tiny-random"), on_space=True)["server_name"] is None
    assert options["mcp_server"] is False  # MCP is opt-in (--mcp)
    assert launch_options(Settings(model="tiny-random", mcp=True))["mcp_server"] is True
    assert (
        launch_options(Settings(model="tiny-random", host="0.0.0.0"), on_space=True)["server_name"]
        == "0.0.0.0"
    )


def test_importing_app_loads_nothing_until_demo_is_used(monkeypatch):
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(ROOT))
    sys.modules.pop("app", None)
    app = importlib.import_module("app")
    assert "demo" not in vars(app), "importing app.py must not build the demo (nor load a model)"
    monkeypatch.setenv("BLIP2_MODEL", "tiny-random")
    demo = app.demo
    assert isinstance(demo, gr.Blocks) and app.demo is demo
    sys.modules.pop("app", None)


@pytest.mark.parametrize("model", ["tiny-random-t5", "tiny-random-instructblip"])
def test_other_families_caption_chat_and_instruction(model, photo):
    from blip2_app.ui import build_demo

    settings = Settings(model=model)
    engine = load_engine(settings)
    other = ChatHandlers(engine, settings)
    assert CaptionHandlers(engine).caption(photo, "detailed", max_new_tokens=4)
    instruction = "Answer in one word." if engine.text.entry.family.instruction_aware else ""
    assert other.answer(photo, "What is it?", True, instruction, max_new_tokens=4)
    messages, session = drain(other.chat(photo, "What is it?", None, instruction, **GREEDY))[-1]
    assert len(session.turns) == 1 and messages[-1]["role"] == "assistant"
    demo = build_demo(settings, engine)
    boxes = [b for b in demo.blocks.values() if getattr(b, "label", None) == "Instruction (InstructBLIP)"]
    assert len(boxes) == 1 and boxes[0].visible == engine.text.entry.family.instruction_aware
