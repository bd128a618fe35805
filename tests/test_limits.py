"""Every limit is a setting (flag + BLIP2_* variable) and holds in the handlers; no server needed.

The black-box checks of the same limits over HTTP are in test_security_http.py and
test_hostile_endpoints.py; the memory check before loading is in test_startup_failures.py.
"""

from __future__ import annotations

import gc
import os
import tempfile
import threading
from pathlib import Path

os.environ.setdefault("BLIP2_TINY_CACHE", tempfile.mkdtemp(prefix="blip2-tiny-"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr
import pytest
import torch

from blip2_app.config import Settings
from blip2_app.errors import ModelLoadError, SettingsError
from blip2_app.loading import PRESETS
from blip2_app.memory import (
    RUNTIME_OVERHEAD_BYTES,
    MemoryBudget,
    check_memory,
    estimate_weight_bytes,
    memory_budget,
    read_mem_available,
)
from blip2_app.startup import load_engine
from blip2_app.ui.guard import _fetches_url, body_limit_bytes
from blip2_app.ui.sessions import GalleryBudget, GallerySession
from blip2_app.ui.tabs.chat import ChatHandlers
from blip2_app.ui.tabs.retrieval import RetrievalHandlers

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = [str(p) for p in sorted((ROOT / "assets" / "examples").glob("*.*"))[:4]]
GREEDY = {"decoding": "greedy", "max_new_tokens": 3}
LIMIT_FLAGS = {
    "max_upload_mb": ("--max-upload-mb", "3", 3),
    "max_image_pixels": ("--max-image-pixels", "1000", 1000),
    "max_gallery_images": ("--max-gallery-images", "7", 7),
    "max_galleries": ("--max-galleries", "4", 4),
    "max_chat_turns": ("--max-chat-turns", "5", 5),
    "max_queue": ("--max-queue", "9", 9),
    "max_sessions": ("--max-sessions", "11", 11),
    "session_ttl_minutes": ("--session-ttl-minutes", "2.5", 2.5),
    "upload_ttl_minutes": ("--upload-ttl-minutes", "30", 30.0),
    "available_memory_mb": ("--available-memory-mb", "4096", 4096),
    "max_upload_request_mb": ("--max-upload-request-mb", "64", 64),
    "upload_mb_per_client_hour": ("--upload-mb-per-client-hour", "100", 100),
    "max_pending_per_client": ("--max-pending-per-client", "3", 3),
    "max_new_sessions_per_client": ("--max-new-sessions-per-client", "40", 40),
    "max_galleries_per_client": ("--max-galleries-per-client", "2", 2),
}


@pytest.fixture(scope="module")
def engine():
    return load_engine(Settings(model="tiny-random"))


def chats_with(engine, **changes) -> ChatHandlers:
    return ChatHandlers(engine, Settings(model="tiny-random", **changes))


def galleries_with(engine, **changes) -> RetrievalHandlers:
    return RetrievalHandlers(engine, Settings(model="tiny-random", **changes))


# --------------------------------------------------------------------------- settings
@pytest.mark.parametrize("field", sorted(LIMIT_FLAGS))
def test_every_limit_has_a_flag_and_a_variable(field):
    flag, text, value = LIMIT_FLAGS[field]
    assert getattr(Settings.from_sources([flag, text], env={}), field) == value
    variable = "BLIP2_" + field.upper()
    assert getattr(Settings.from_sources([], env={variable: text}), field) == value
    assert getattr(Settings.from_sources([flag, text], env={variable: "999"}), field) == value, "flag wins"


def test_defaults_are_the_documented_ones():
    s = Settings()
    assert (s.host, s.share, s.max_queue, s.max_upload_mb, s.max_image_pixels) == (
        "127.0.0.1",
        False,
        16,
        25,
        40_000_000,
    )
    assert (s.max_gallery_images, s.max_galleries, s.max_chat_turns, s.max_sessions) == (None, 32, 50, 1000)
    assert (s.session_ttl_minutes, s.upload_ttl_minutes, s.available_memory_mb) == (360, 360, None)


@pytest.mark.parametrize(
    "changes",
    [
        {"max_galleries": 0},
        {"max_gallery_images": 0},
        {"max_chat_turns": 0},
        {"max_sessions": 0},
        {"max_queue": 0},
        {"session_ttl_minutes": 0},
        {"upload_ttl_minutes": -1},
        {"upload_ttl_minutes": float("nan")},
        {"available_memory_mb": -1},
    ],
)
def test_nonsense_limits_are_refused(changes):
    with pytest.raises(SettingsError, match=next(iter(changes))):
        Settings(**changes)


def test_cli_style_namespaces_still_follow_the_variables():
    import argparse

    settings = Settings.from_namespace(
        argparse.Namespace(model="tiny-random"), env={"BLIP2_AVAILABLE_MEMORY_MB": "7"}
    )
    assert settings.model == "tiny-random" and settings.available_memory_mb == 7


def test_docs_list_every_limit():
    text = (ROOT / "docs" / "configuration.md").read_text()
    for field, (flag, _, _) in LIMIT_FLAGS.items():
        assert flag in text, flag
        assert "BLIP2_" + field.upper() in text, field


# --------------------------------------------------------------------------- wiring
def test_demo_and_launch_use_the_settings(engine):
    from blip2_app.ui import build_demo, launch_options

    settings = Settings(model="tiny-random", session_ttl_minutes=2, upload_ttl_minutes=0.5, max_sessions=12)
    demo = build_demo(settings, engine)
    assert demo.delete_cache == (30, 30)
    ttls = {block.time_to_live for block in demo.blocks.values() if isinstance(block, gr.State)}
    assert ttls == {120}, "chat and gallery state expire after --session-ttl-minutes"
    options = launch_options(settings)
    assert options["state_session_capacity"] == 12
    bodies, uploads, fair = options["app_kwargs"]["middleware"]
    assert bodies.kwargs["max_body_bytes"] == body_limit_bytes(settings.max_upload_mb)
    assert uploads.kwargs["limits"].max_file_bytes == settings.max_upload_mb * 2**20
    assert uploads.kwargs["limits"].max_files == 200
    assert uploads.kwargs["limits"].max_request_bytes == settings.max_upload_request_mb * 2**20
    assert uploads.kwargs["limits"].client_bytes_per_window == settings.upload_mb_per_client_hour * 2**20
    assert fair.kwargs["limits"].max_pending == settings.max_pending_per_client
    assert fair.kwargs["limits"].max_new_sessions == settings.max_new_sessions_per_client
    assert build_demo(Settings(model="tiny-random"), engine).delete_cache == (3600, 6 * 3600)


@pytest.mark.parametrize(
    ("path", "refused"),
    [
        ("/gradio_api/file=http://example.com/a.png", True),
        ("/gradio_api/file=HTTPS://example.com/a.png", True),
        ("/gradio_api/file=http%3A%2F%2Fexample.com", True),
        ("/gradio_api/file=http%253A%252F%252Fexample.com", True),
        ("/gradio_api/file=//example.com/a.png", True),
        ("/gradio_api/file=/tmp/gradio/abc/cat.png", False),
        ("/gradio_api/file=assets/examples/cat.png", False),
        ("/gradio_api/upload", False),
    ],
)
def test_guard_recognises_url_fetches(path, refused):
    assert _fetches_url(path) is refused


# --------------------------------------------------------------------------- chats and galleries
def test_chat_keeps_at_most_max_chat_turns(engine):
    h = chats_with(engine, max_chat_turns=2)
    session = None
    for number in range(4):
        *_, (messages, session) = h.chat(
            PHOTOS[0], f"question {number}?", None, "", **GREEDY, session=session
        )
    assert [t.question for t in session.turns] == ["question 2?", "question 3?"]
    # The answer is written after the 2 kept turns, which the chat shows above it.
    assert [m["content"] for m in messages if m["role"] == "user"] == [
        "question 1?",
        "question 2?",
        "question 3?",
    ]


def test_gallery_size_is_a_setting(engine):
    h = galleries_with(engine, max_gallery_images=2)
    with pytest.raises(gr.Error, match="index at most 2 images at a time"):
        h.index_gallery(PHOTOS[:3], False, None)
    _, gallery = h.index_gallery(PHOTOS[:2], False, None)
    assert len(gallery) == 2
    with pytest.raises(gr.Error, match=r"This gallery is full \(2 images\)"):
        h.index_gallery(PHOTOS[2:3], False, gallery)


def test_at_most_max_galleries_hold_memory(engine):
    h = galleries_with(engine, max_galleries=2)
    _, alice = h.index_gallery(PHOTOS[:1], False, None)
    _, bob = h.index_gallery(PHOTOS[1:2], False, None)
    assert len(h.galleries) == 2
    h.search_text("a photo", 1, False, 1, alice)  # alice is now the most recently used
    _, carol = h.index_gallery(PHOTOS[2:3], False, None)
    assert len(h.galleries) == 2 and bob.evicted and not alice.evicted and len(bob) == 0
    with pytest.raises(gr.Error, match="emptied to make room.*at most 2 in memory"):
        h.search_text("a photo", 1, False, 1, bob)
    with pytest.raises(gr.Error, match="emptied to make room"):
        h.search_image(PHOTOS[0], 1, bob)
    status, bob_again = h.index_gallery(PHOTOS[1:2], False, bob)  # indexing again starts afresh
    assert status.startswith("Indexed 1 new image") and not bob_again.evicted
    assert len(h.galleries) == 2 and alice.evicted and not carol.evicted
    h.clear_gallery(carol)
    assert len(h.galleries) == 1


def test_dropped_sessions_free_their_budget():
    budget = GalleryBudget(3)
    sessions = [GallerySession() for _ in range(3)]
    for session in sessions:
        session.images["x"] = b"jpeg"  # pretend it holds something
        session.index = type("FakeIndex", (), {"__len__": lambda self: 1})()
        with budget.use(session):
            pass
    assert len(budget) == 3
    del sessions[0], session
    gc.collect()
    assert len(budget) == 2, "the budget holds weak references only"


def test_galleries_in_use_are_not_evicted():
    budget = GalleryBudget(1)
    busy, other = GallerySession(), GallerySession()
    for session in (busy, other):
        session.index = type("FakeIndex", (), {"__len__": lambda self: 1})()
    entered, release = threading.Event(), threading.Event()

    def hold():
        with budget.use(busy):
            entered.set()
            release.wait(10)

    worker = threading.Thread(target=hold)
    worker.start()
    entered.wait(10)
    with budget.use(other):
        pass
    assert not busy.evicted, "a gallery a request is using is never emptied under it"
    release.set()
    worker.join(10)
    assert busy.evicted != other.evicted  # back at the limit: one of them made room


# --------------------------------------------------------------------------- memory estimate
def test_weight_estimate_follows_the_precisions():
    linear = ("language_model.model.decoder.layers.0.fc1.weight", "F32", (10240, 2560))
    norm = ("language_model.model.decoder.layers.0.final_layer_norm.weight", "F32", (2560,))
    embed = ("language_model.model.decoder.embed_tokens.weight", "F32", (50272, 2560))
    vision = ("vision_model.encoder.layers.0.mlp.fc1.weight", "F16", (6144, 1408))
    tensors = [linear, norm, embed, vision]
    n_linear, n_embed, n_vision = 10240 * 2560, 50272 * 2560, 6144 * 1408

    def estimate(preset: str) -> int:
        return estimate_weight_bytes(tensors, PRESETS[preset])

    assert estimate("fp32") == 4 * (n_linear + 2560 + n_embed + n_vision)
    assert estimate("bf16") == 2 * (n_linear + 2560 + n_embed + n_vision)
    # int8 / nf4: the LLM's Linear weights quantized, its other tensors in the load dtype (fp32:
    # the Q-Former asks for it), the vision encoder in bf16.
    assert estimate("int8") == n_linear + 4 * (2560 + n_embed) + 2 * n_vision
    assert estimate("nf4") == n_linear // 2 + 4 * (2560 + n_embed) + 2 * n_vision
    assert estimate("dynamic-int8") == n_linear + 4 * 2560 + 2 * n_embed + n_vision
    assert estimate_weight_bytes(tensors, PRESETS["fp32"], skip=("vision_model.",)) == 4 * (
        n_linear + 2560 + n_embed
    )


def test_memory_budget_sources(tmp_path):
    cpu = torch.device("cpu")
    assert memory_budget(Settings(available_memory_mb=0), cpu).available_bytes is None
    assert memory_budget(Settings(available_memory_mb=5), cpu).available_bytes == 5 * 1024 * 1024
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemAvailable:    2048 kB\n")
    assert read_mem_available(meminfo) == 2048 * 1024
    assert read_mem_available(tmp_path / "missing") is None


def test_memory_check_refuses_and_accumulates(engine):
    entry = engine.text.entry
    precisions = engine.text.loaded.precisions
    roomy = check_memory(entry, precisions, MemoryBudget(10**10, "test"))
    assert roomy.used_bytes > RUNTIME_OVERHEAD_BYTES
    with pytest.raises(ModelLoadError, match=r"Not enough memory to load tiny-random .*\(test\)"):
        check_memory(entry, precisions, MemoryBudget(RUNTIME_OVERHEAD_BYTES, "test"))
    unchecked = MemoryBudget(None, "off")
    assert check_memory(entry, precisions, unchecked) is unchecked


def test_a_larger_pixel_limit_really_applies(monkeypatch):
    """images.py lowers Pillow's global guard to 40 M pixels; --max-image-pixels above it raises it."""
    import io

    from PIL import Image

    from blip2_app.images import ImageDecodeError, ImageLimits, load_image
    from blip2_app.startup import allow_pillow_pixels

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000_000)
    buffer = io.BytesIO()
    Image.new("1", (10_000, 6_000)).save(buffer, format="PNG")  # 60 M pixels, a few KB
    limits = ImageLimits(max_pixels=100_000_000)
    with pytest.raises(ImageDecodeError):
        load_image(buffer.getvalue(), limits)
    allow_pillow_pixels(limits.max_pixels)
    assert load_image(buffer.getvalue(), limits).size == (4096, 2458)  # decoded, then bounded to 4096 px
    with pytest.raises(ImageDecodeError, match="10000 x 6000 pixels, the limit is 50,000,000"):
        load_image(buffer.getvalue(), ImageLimits(max_pixels=50_000_000))


def test_safe_widgets_survive_gradio_rebuilding_them():
    """An update to a component (e.g. an example click) makes Gradio build a new one from its class."""
    from gradio.data_classes import FileData, ListFiles

    from blip2_app.ui.components import ImageFiles, SafeImage, image_files, safe_image

    hostile = str(ROOT / "tests" / "data" / "hostile" / "pillow_decompression_bomb.gif")
    for widget, cls in ((safe_image(label="Image"), SafeImage), (image_files(label="Files"), ImageFiles)):
        rebuilt = widget.__class__(**{**widget.constructor_args, "render": False})
        assert isinstance(rebuilt, cls) and rebuilt.get_block_name() == widget.get_block_name()
    image = SafeImage(**{**safe_image().constructor_args, "render": False})
    assert image.preprocess(FileData(path=hostile)) == hostile, "passed on, never decoded"
    files = ImageFiles(**{**image_files().constructor_args, "render": False})
    assert files.preprocess(ListFiles(root=[FileData(path=hostile)])) == [hostile]
    assert not (ROOT / "blip2_app" / "ui" / "components.pyi").exists(), "no stub written next to the code"


def test_heap_trimmer_runs_and_stops():
    from blip2_app.allocator import start_heap_trimmer

    thread = start_heap_trimmer(interval_s=0.01)
    if thread is None:
        pytest.skip("not glibc")
    assert thread.is_alive() and thread.daemon
    thread.stop.set()
    thread.join(5)
    assert not thread.is_alive()


def test_allocator_mmaps_big_blocks_while_loading_only(monkeypatch):
    """Loading mmaps blocks of 1 MB and up (peak memory); serving goes back to 32 MB (speed),
    also when loading fails."""
    from blip2_app import allocator

    calls = []

    class FakeLibc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))

        def malloc_trim(self, pad):
            return 1

    monkeypatch.setattr(allocator, "_libc", FakeLibc)

    def thresholds():
        return [value for parameter, value in calls if parameter == allocator.M_MMAP_THRESHOLD]

    load_engine(Settings(model="tiny-random", retrieval_model="none"))
    assert thresholds() == [1 << 20, 32 << 20]
    assert (allocator.M_ARENA_MAX, 2) in calls
    calls.clear()
    with pytest.raises(ModelLoadError):
        load_engine(Settings(model="/no/such/folder"))
    assert thresholds() == [1 << 20, 32 << 20]
    calls.clear()
    load_engine(
        Settings.from_sources(["--model", "tiny-random", "--retrieval-model", "none", "--low-memory"], {})
    )
    assert thresholds() == [1 << 20], "--low-memory keeps the loading threshold while serving"
    calls.clear()
    load_engine(
        Settings.from_sources(
            ["--model", "tiny-random", "--retrieval-model", "none"], {"BLIP2_LOW_MEMORY": "1"}
        )
    )
    assert thresholds() == [1 << 20]


def test_result_gallery_writes_shared_images_atomically(tmp_path, monkeypatch):
    """Two visitors getting the same picture share one cached file: it is never rewritten in place."""
    from PIL import Image

    from blip2_app.ui.components import ResultGallery

    gallery = ResultGallery(render=False)
    monkeypatch.setattr(gallery, "GRADIO_CACHE", str(tmp_path))
    picture = Image.new("RGB", (16, 16), "green")
    first = gallery.postprocess([(picture, "#1 a")]).root[0].image.path
    inode = os.stat(first).st_ino
    second = gallery.postprocess([(picture.copy(), "#1 b")]).root[0].image.path
    assert first == second and os.stat(second).st_ino == inode, "same file, not rewritten"
    assert not [p for p in Path(first).parent.iterdir() if p.name.startswith(".")], "no staging files left"
    assert gallery.postprocess(None).root == []
