"""Gradio's risky defaults (DESIGN.md "Security notes"), each checked black-box over HTTP on loopback.

One app (`--model tiny-random`) with small limits; every test talks to it with plain httpx, the
way an attacker would, and checks what the server really refuses (status codes, messages) and
that it keeps serving afterwards.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("BLIP2_TINY_CACHE", tempfile.mkdtemp(prefix="blip2-tiny-"))

import httpx
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from running_app import FILE_META, QueueAPI, running_app

ROOT = Path(__file__).resolve().parents[1]
PHOTO = str(sorted((ROOT / "assets" / "examples").glob("*.*"))[0])
HOSTILE = ROOT / "tests" / "data" / "hostile"
UPLOAD_MB = 2
CANARY = "canary-" + uuid.uuid4().hex  # in the server's environment: must never come back
# --max-batch-size 1: captions run one at a time, as --concurrency 1 says (batched, up to 8 run
# at once in their own group, and the bounded-queue test below could not fill the queue).
ARGS = [
    "--max-upload-mb", str(UPLOAD_MB), "--concurrency", "1", "--max-queue", "2", "--max-batch-size", "1",
    "--max-sessions", "3", "--max-galleries", "2", "--upload-ttl-minutes", "0.05",
]  # fmt: skip


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("security"), ARGS, env={"BLIP2_TEST_CANARY": CANARY}) as running:
        yield running


@pytest.fixture(scope="module")
def api(app) -> QueueAPI:
    return QueueAPI(app.url)


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


SMALL = png_data_url(Image.new("RGB", (48, 32), "red"))
QUICK = ["short", "", "greedy", 1, 1.0, 0.9, 1, 3]  # /caption after the image: 3 greedy tokens


def still_serves(api: QueueAPI) -> None:
    result = api.call("caption", [{"path": SMALL}, *QUICK])
    assert result["ok"], result


# --------------------------------------------------------------------------- api_open=False
def test_rest_run_route_cannot_skip_the_queue(app, api):
    named = httpx.post(
        app.url + "gradio_api/run/caption", json={"data": [{"path": SMALL}, "short"]}, timeout=10
    )
    assert named.status_code == 404
    by_index = httpx.post(
        app.url + "gradio_api/run/predict",
        json={"data": [{"path": SMALL}, "short"], "fn_index": api.fn_index["caption"]},
        timeout=10,
    )
    assert by_index.status_code >= 400 and "join the queue" in by_index.text
    still_serves(api)


# --------------------------------------------------------------------------- bounded queue
def test_queue_is_bounded_and_says_so(api):
    slow = {"path": SMALL}, "short", "", "beam", 10, 1.0, 0.9, 200, 200  # forced 200 tokens, 10 beams
    bodies = [api.payload("caption", list(slow)) for _ in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(api.join, bodies))
    statuses = [r.status_code for r in responses]
    full = [r for r in responses if r.status_code == 503]
    assert len(full) >= 3, statuses  # 1 running + at most 2 waiting (--max-queue 2)
    assert all("Queue is full" in r.text for r in full)
    for body, response in zip(bodies, responses, strict=True):  # let the accepted ones finish
        if response.status_code == 200:
            list(api.events(body["session_hash"], timeout=120))
    still_serves(api)


# --------------------------------------------------------------------------- base64 / pixel bombs
@pytest.mark.parametrize(
    "name", ["made_png_header_claims_100000x100000.png", "pillow_decompression_bomb.gif"]
)
def test_base64_bombs_are_refused_before_decoding(api, name):
    data = (HOSTILE / name).read_bytes()
    url = f"data:image/{name.rsplit('.', 1)[1]};base64," + base64.b64encode(data).decode()
    result = api.call("caption", [{"path": url}, *QUICK])
    assert not result["ok"] and "This image is too large" in result["error"], result
    still_serves(api)


def test_a_real_13000_pixel_square_png_costs_no_memory(app, api):
    # Bilevel, so the test itself stays small: 656 KB-class PNG, 169 M pixels once decoded.
    url = png_data_url(Image.new("1", (13_000, 13_000), 1))
    before = app.rss_bytes()
    for endpoint, data in (("caption", [{"path": url}, *QUICK]), ("answer", [{"path": url}, "What is it?"])):
        result = api.call(endpoint, data)
        assert not result["ok"] and "13000 x 13000 pixels" in result["error"], result
    assert app.rss_bytes() - before < 100 * 1024 * 1024, "the pixels must never be decoded"


def test_json_bodies_are_bounded(app, api):
    huge = "data:image/png;base64," + "A" * (5 * 1024 * 1024)  # above 2 MB x 4/3 + 1 MB
    response = api.join(api.payload("caption", [{"path": huge}, "short"]))
    assert response.status_code == 413 and "larger than the server accepts" in response.text
    # Within the body limit but over the upload limit once decoded: the decoder refuses it.
    over = "data:image/png;base64," + "A" * (int(2.5 * 1024 * 1024) * 4 // 3)
    result = api.call("caption", [{"path": over}, *QUICK])
    assert not result["ok"] and "too large" in result["error"] and "limit is 2 MB" in result["error"]
    still_serves(api)


def test_uploads_over_the_limit_get_413(app):
    blob = b"\x89PNG\r\n\x1a\n" + os.urandom((UPLOAD_MB + 1) * 1024 * 1024)
    response = httpx.post(
        app.url + "gradio_api/upload", files={"files": ("big.png", blob, "image/png")}, timeout=30
    )
    assert response.status_code == 413


# --------------------------------------------------------------------------- text limits (server side)
def test_text_limits_hold_on_the_server(api):
    long_question = api.call("answer", [{"path": SMALL}, "why? " * 20_000])  # 100k characters
    assert not long_question["ok"] and "limit is 2,000 characters" in long_question["error"]
    long_query = api.call("search_text", ["x" * 5000])
    assert not long_query["ok"]  # empty gallery or the 500-character limit: never processed
    five_mb = api.join(api.payload("answer", [{"path": SMALL}, "a" * (5 * 1024 * 1024)]))
    assert five_mb.status_code == 413
    still_serves(api)


# --------------------------------------------------------------------------- monitoring
def test_monitoring_is_off(app):
    for path in (
        "monitoring",
        "monitoring/summary",
        "gradio_api/monitoring",
        "gradio_api/monitoring/summary",
    ):
        response = httpx.get(app.url + path, timeout=10)
        assert response.status_code in (403, 404), path
        assert "summary" not in response.text.lower() or response.status_code == 404


# --------------------------------------------------------------------------- files served
OUTSIDE = [
    "/etc/passwd",
    "/proc/self/environ",
    "../../../../etc/passwd",
    "..%2f..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "%252e%252e%252f%252e%252e%252fetc%252fpasswd",
    "app.py",
    str(ROOT / "app.py"),
    str(ROOT / "blip2_app" / "config.py"),
    "/tmp/gradio/../../etc/passwd",
    "/proc/self/cmdline",
]


@pytest.mark.parametrize("path", OUTSIDE)
def test_no_file_outside_the_app_is_served(app, path):
    response = httpx.get(app.url + "gradio_api/file=" + path, timeout=10)
    assert response.status_code in (400, 403, 404), (path, response.status_code)
    assert "root:" not in response.text and CANARY not in response.text


def test_uploaded_files_are_served_and_then_deleted(app):
    """--upload-ttl-minutes 0.05: Gradio's delete_cache removes the upload a few seconds later."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buffer, format="PNG")
    upload = httpx.post(
        app.url + "gradio_api/upload", files={"files": ("blue.png", buffer.getvalue())}, timeout=10
    )
    path = upload.json()[0]
    assert httpx.get(app.url + "gradio_api/file=" + path, timeout=10).status_code == 200
    deadline = time.monotonic() + 30
    while Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not Path(path).exists(), "uploads must not stay on disk until restart"
    assert httpx.get(app.url + "gradio_api/file=" + path, timeout=10).status_code in (403, 404)


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/cat.png",
        "https://example.com/cat.png",
        "http%3A//example.com/cat.png",
        "HTTP://example.com/cat.png",
        "//example.com/cat.png",
        "http://127.0.0.1:1/secret",
        "http://169.254.169.254/latest/meta-data/",
    ],
)
def test_file_route_is_not_an_open_proxy(app, url):
    response = httpx.get(app.url + "gradio_api/file=" + url, timeout=10)
    assert response.status_code == 403 and "does not fetch URLs" in response.text


def test_proxy_route_refuses_arbitrary_urls(app):
    response = httpx.get(app.url + "gradio_api/proxy=http://example.com/cat.png", timeout=10)
    assert response.status_code in (400, 403, 404)


# --------------------------------------------------------------------------- forged file payloads
@pytest.mark.parametrize(
    "payload",
    [
        {"path": "/etc/passwd"},
        {"path": "/proc/self/environ"},
        {"path": "app.py"},
        {"path": "../../../../etc/passwd"},
        {"path": "/etc/passwd", "meta": FILE_META},
        {"path": "/proc/self/environ", "meta": FILE_META},
        {"path": "http://example.com/cat.png"},
        {"path": "http://example.com/cat.png", "meta": FILE_META},
        {"path": "http://127.0.0.1:1/x.png", "meta": FILE_META},
        {"path": "x.png", "url": "http://example.com/cat.png"},
    ],
)
def test_forged_file_payloads_read_nothing(api, payload):
    for endpoint, data in (
        ("caption", [payload, *QUICK]),
        ("index_gallery", [[payload]]),
    ):
        result = api.call(endpoint, data)
        assert not result["ok"], (endpoint, payload, result)
        text = str(result.get("error"))
        assert CANARY not in text and "root:" not in text and "Traceback" not in text
        # Our own sentences: the app's decoder, or StudioBlocks where Gradio refuses the payload.
        assert (
            "not uploaded to this server" in text
            or "URLs are not fetched" in text
            or "a file must be one this server gave out" in text
        ), text
    still_serves(api)


# --------------------------------------------------------------------------- binding, share, sessions
def test_bound_to_loopback_only(app):
    port = int(app.url.rsplit(":", 1)[1].strip("/"))
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                listening.append(local.rsplit(":", 1)[0])
    assert listening == ["0100007F"], listening  # 127.0.0.1 only, no IPv6 / wildcard socket
    assert "public URL" not in app.log(100_000) and "gradio.live" not in app.log(100_000)


def test_old_sessions_are_dropped_beyond_max_sessions(app, api):
    """--max-sessions 3: the oldest session's chat is gone after three newer sessions that hold a
    chat; sessions that hold nothing (a caption) do not push it out."""
    alice = Client(app.url, verbose=False)
    image = handle_file(PHOTO)
    alice.predict(image, "First?", decoding="greedy", max_new_tokens=2, api_name="/chat")
    again = alice.predict(image, "Second?", decoding="greedy", max_new_tokens=2, api_name="/chat")
    assert [m["role"] for m in again] == ["user", "assistant", "user", "assistant"]
    for _ in range(3):
        assert api.call("caption", [{"path": SMALL}, *QUICK])["ok"]  # each call: a new session
    kept = alice.predict(image, "Third?", decoding="greedy", max_new_tokens=2, api_name="/chat")
    assert [m["role"] for m in kept] == ["user", "assistant"] * 3, "stateless sessions go first"
    for number in range(3):
        other = Client(app.url, verbose=False)
        other.predict(image, f"Other {number}?", decoding="greedy", max_new_tokens=2, api_name="/chat")
    after = alice.predict(image, "Fourth?", decoding="greedy", max_new_tokens=2, api_name="/chat")
    assert [m["role"] for m in after] == ["user", "assistant"], "the evicted session starts afresh"


def test_clicking_an_example_keeps_the_safe_decoder(app, api):
    """Gradio rebuilds a component for the session when an event updates it (an example click
    does); the rebuilt image input must still hand uploads to our decoder, not decode them itself."""
    config = httpx.get(app.url + "config", timeout=10).json()
    image_id = next(
        c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "caption-image"
    )
    fn_index, load = next(
        (i, d) for i, d in enumerate(config["dependencies"]) if d["outputs"] == [image_id] and d["targets"]
    )
    session = uuid.uuid4().hex[:12]
    clicked = httpx.post(
        app.url + "gradio_api/run/predict",
        json={
            "fn_index": fn_index,
            "data": [0],
            "session_hash": session,
            "trigger_id": load["targets"][0][0],
        },
        timeout=10,
    )
    assert clicked.status_code == 200 and clicked.json()["data"][0]["type"] == "filepath"
    bomb = (HOSTILE / "pillow_decompression_bomb.gif").read_bytes()
    path = httpx.post(app.url + "gradio_api/upload", files={"files": ("bomb.gif", bomb)}, timeout=10).json()[
        0
    ]
    result = api.call("caption", [{"path": path, "meta": FILE_META}, *QUICK], session_hash=session)
    assert not result["ok"] and "This image is too large" in str(result["error"]), result


def test_galleries_in_memory_are_bounded(app):
    """--max-galleries 2: a third session's gallery empties the least recently used one."""
    from gradio_client.exceptions import AppError

    photos = sorted((ROOT / "assets" / "examples").glob("*.*"))
    alice, bob, carol = (Client(app.url, verbose=False) for _ in range(3))
    for client, photo in ((alice, photos[0]), (bob, photos[1]), (carol, photos[2])):
        assert client.predict([handle_file(str(photo))], api_name="/index_gallery").startswith("Indexed 1")
    with pytest.raises(AppError, match="emptied to make room for other visitors' galleries"):
        alice.predict("a photo", 3, api_name="/search_text")
    assert len(bob.predict("a photo", 3, api_name="/search_text")) == 1
    assert len(carol.predict("a photo", 3, api_name="/search_text")) == 1
    assert alice.predict([handle_file(str(photos[0]))], api_name="/index_gallery").startswith("Indexed 1")
