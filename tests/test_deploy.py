"""Deployment: the loading page and /healthz, the Docker image's start-up, ZeroGPU, example caching.

No Docker engine runs here, so the image is checked by doing what it does: the repository is
copied as the build context would be (minus .dockerignore), and the Dockerfile's CMD and
HEALTHCHECK commands are run from that copy with the Dockerfile's ENV.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from blip2_app.config import Settings
from blip2_app.ui import build_demo
from blip2_app.ui.health import HealthRoute, readiness
from blip2_app.ui.loading_page import LoadingServer
from blip2_app.ui.tabs import TabContext
from blip2_app.ui.tabs.common import MODEL_GROUPS
from blip2_app.ui.zerogpu import declared_gpu_seconds, gpu

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180
EXAMPLE = sorted((ROOT / "assets" / "examples").glob("*.jpg"))[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- loading page
def test_loading_server_shows_progress_and_answers_503_on_healthz(caplog):
    caplog.set_level(logging.INFO, logger="blip2_app")
    port = free_port()
    server = LoadingServer("127.0.0.1", port, "blip2-opt-2.7b")
    server.start()
    try:
        secret = "/home/owner/.cache/huggingface, MemAvailable 12.3 GB"
        logging.getLogger("blip2_app.loading").info("Reading the weights from %s", secret)
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert page.status_code == 200  # a Space shows visitors this page, not an error
        assert "BLIP-2 Studio is loading" in page.text and "blip2-opt-2.7b" in page.text
        assert "/home/owner" not in page.text  # log lines stay in the server log (finding 10)
        assert 'http-equiv="refresh"' in page.text
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert health.status_code == 503 and health.headers["retry-after"]
        body = health.json()
        assert body["status"] == "loading" and body["model"] == "blip2-opt-2.7b"
        assert "log" not in body and "/home/owner" not in health.text
        # API routes are not Gradio's yet: a client is told to retry, not handed HTML.
        assert httpx.get(f"http://127.0.0.1:{port}/config", timeout=5).status_code == 503
    finally:
        server.stop()
    with socket.socket() as s:  # the port is free again for Gradio
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_loading_server_refuses_a_taken_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError):
            LoadingServer("127.0.0.1", busy.getsockname()[1], "tiny-random").start()


def test_health_route_answers_before_the_app_and_passes_the_rest(load_tiny):
    engine = load_tiny("tiny-random")
    payload = readiness(engine)
    assert payload == {
        "status": "ready",
        "model": "tiny-random",
        "retrieval_model": "tiny-random-itm",
        "device": "cpu",
        "precision": engine.text.loaded.precisions.as_dict(),
        "backend": "local",
        "packing": None,  # fp32: nothing to pack
    }
    app = Starlette(
        routes=[Route("/{path:path}", lambda request: PlainTextResponse("app"), methods=["GET", "POST"])],
        middleware=[Middleware(HealthRoute, payload=lambda: payload)],
    )
    with TestClient(app) as client:
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json() == payload
        assert health.headers["cache-control"] == "no-store"
        assert client.get("/healthz/more").text == "app"
        assert client.post("/healthz").text == "app"
        assert client.get("/").text == "app"


# --------------------------------------------------------------------------- the image's start-up
def dockerfile() -> dict:
    """ENV, WORKDIR, CMD and the HEALTHCHECK command of the Dockerfile (continuations joined)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out: dict = {"env": {}}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, _, value = pair.partition("=")
                out["env"][key] = value
        elif line.startswith("WORKDIR "):
            out["workdir"] = line.split(None, 1)[1]
        elif line.startswith("CMD "):
            out["cmd"] = json.loads(line[4:])
        elif line.startswith("HEALTHCHECK "):
            out["healthcheck"] = json.loads(line.split(" CMD ", 1)[1])
    return out


def build_context(destination: Path) -> None:
    """The files `COPY . .` puts in the image: the repository minus .dockerignore's patterns."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to list the build context")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    patterns = [p for p in (ROOT / ".dockerignore").read_text().split() if p and not p.startswith("#")]

    def ignored(path: str) -> bool:
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        for pattern in patterns:
            bare = pattern.removeprefix("**/")
            for prefix in prefixes:
                name = prefix.rsplit("/", 1)[-1]
                if fnmatch.fnmatch(prefix, pattern) or (
                    pattern.startswith("**/") and fnmatch.fnmatch(name, bare)
                ):
                    return True
        return False

    for path in listed:
        if ignored(path) or not (ROOT / path).is_file():
            continue
        target = destination / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, target)


def test_the_image_starts_the_app_and_its_healthcheck_follows_loading(tmp_path):
    image = dockerfile()
    assert image["cmd"] == ["python", "app.py"]
    assert image["healthcheck"] == ["python", "-m", "blip2_app.healthcheck"]
    env_in_image = image["env"]
    assert env_in_image["BLIP2_HOST"] == "0.0.0.0" and env_in_image["BLIP2_PORT"] == "7860"

    root = tmp_path / "root"  # stands in for the container's /
    app_dir = root / image["workdir"].lstrip("/")
    build_context(app_dir)
    assert (app_dir / "app.py").is_file() and (app_dir / "assets" / "examples").is_dir()
    assert not (app_dir / "tests").exists() and not (app_dir / ".git").exists()

    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        **env_in_image,
        "HOME": str(root / env_in_image["HOME"].lstrip("/")),
        "HF_HOME": str(root / env_in_image["HF_HOME"].lstrip("/")),
        # Only what a test must change: loopback instead of 0.0.0.0, a free port, the offline model.
        "BLIP2_HOST": "127.0.0.1",
        "BLIP2_PORT": str(port),
        "BLIP2_MODEL": "tiny-random",
        "BLIP2_TINY_CACHE": os.environ["BLIP2_TINY_CACHE"],
        "HF_HUB_OFFLINE": "1",
        "GRADIO_EXAMPLES_CACHE": str(tmp_path / "examples-cache"),
    }
    for folder in (env["HOME"], env["HF_HOME"]):
        Path(folder).mkdir(parents=True, exist_ok=True)  # HOME holds the app folder already

    def healthcheck() -> subprocess.CompletedProcess:
        command = [sys.executable if part == "python" else part for part in image["healthcheck"]]
        return subprocess.run(command, cwd=app_dir, env=env, capture_output=True, text=True, timeout=30)

    assert healthcheck().returncode == 1  # nothing listens yet

    log_path = tmp_path / "app.log"
    command = [sys.executable if part == "python" else part for part in image["cmd"]]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=app_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    answers: list[tuple[int, dict]] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers or answers[-1][0] != 200:
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                reply = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                answers.append((reply.status_code, reply.json()))
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        # The port answered while the model loaded (503 "loading"), then the app took it over.
        assert answers[0][0] == 503 and answers[0][1]["status"] == "loading", answers[:3]
        assert answers[0][1]["model"] == "tiny-random"
        assert answers[-1][1]["status"] == "ready" and answers[-1][1]["model"] == "tiny-random"
        assert "BLIP-2 Studio" in httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text

        check = healthcheck()
        assert check.returncode == 0, check.stdout + check.stderr
        assert json.loads(check.stdout)["status"] == "ready"
    finally:
        process.terminate()
        process.wait(timeout=20)


# --------------------------------------------------------------------------- ZeroGPU
def fake_spaces() -> tuple[types.ModuleType, list[tuple[str, int]]]:
    booked: list[tuple[str, int]] = []
    module = types.ModuleType("spaces")

    def gpu(duration: int = 60):
        def decorate(fn):
            @functools.wraps(fn)
            def call(*args, **kwargs):
                booked.append((fn.__name__, duration))
                return fn(*args, **kwargs)

            call.gpu_seconds = duration
            return call

        return decorate

    module.GPU = gpu
    return module, booked


def model_functions(demo) -> dict[str, object]:
    return {getattr(f.fn, "__name__", ""): f.fn for f in demo.fns.values() if f.fn is not None}


def test_handlers_book_a_zerogpu_when_spaces_is_present(load_tiny, monkeypatch):
    spaces, booked = fake_spaces()
    monkeypatch.setitem(sys.modules, "spaces", spaces)
    settings = Settings(model="tiny-random", cache_examples="lazy")
    demo = build_demo(settings, load_tiny("tiny-random"))
    functions = model_functions(demo)
    # /search_text and /search_image run text_search and image_search (they also keep the last
    # search for the results note); then issue 18's and issue 17's model events.
    for name in (
        *("caption", "answer", "chat", "regenerate", "index_gallery", "text_search", "image_search"),
        *("answer_topk", "edit_last", "more_like_this", "caption_search", "combined_search", "load_gallery"),
        *("caption_batch", "match", "explain", "classify", "search_images"),
    ):
        declared = declared_gpu_seconds(functions[name].__wrapped__)  # by @gpu, where the handler is
        assert declared is not None and functions[name].gpu_seconds == declared, name
    # Every event in the model's concurrency groups (caption and answer have one of their own, to
    # wait for batch-mates) books a GPU; nothing else does.
    for block_fn in demo.fns.values():
        in_model_group = block_fn.concurrency_id in MODEL_GROUPS
        assert hasattr(block_fn.fn, "gpu_seconds") == in_model_group, block_fn.name
    assert not hasattr(functions["model_report"], "gpu_seconds")  # no model call, no GPU booked
    functions["caption"](str(EXAMPLE))
    assert booked == [("caption", declared_gpu_seconds(functions["caption"].__wrapped__))]
    assert booked[0][1] == 60


def test_a_model_handler_without_declared_gpu_time_is_refused(load_tiny):
    settings = Settings(model="tiny-random")
    context = TabContext(settings, load_tiny("tiny-random"), spaces=None)

    def undeclared(image):
        return image

    with pytest.raises(TypeError, match="declares no GPU time"):
        context.model_event(undeclared)
    assert context.model_event(gpu(seconds=5)(undeclared))["fn"] is undeclared  # no spaces: unchanged


def test_a_declared_handler_wired_outside_the_model_group_is_refused(load_tiny, monkeypatch):
    import gradio as gr

    from blip2_app.ui.tabs import caption

    real_build = caption.build

    def sloppy_build(context):
        real_build(context)
        with gr.Tab("Sneaky"):
            button = gr.Button("Sneaky")
        button.click(gpu(seconds=30)(lambda: "x"), None, None)  # declares GPU time, wired by hand

    monkeypatch.setattr(caption, "build", sloppy_build)
    with pytest.raises(RuntimeError, match="wired without their GPU booking"):
        build_demo(Settings(model="tiny-random"), load_tiny("tiny-random"))


def test_without_spaces_the_handlers_are_unchanged(load_tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)  # `import spaces` raises ImportError
    demo = build_demo(Settings(model="tiny-random"), load_tiny("tiny-random"))
    assert not any(hasattr(fn, "gpu_seconds") for fn in model_functions(demo).values())


# --------------------------------------------------------------------------- example caching
def test_examples_are_cached_lazily_on_a_space_only():
    assert Settings.from_sources([], env={}).cache_examples == "off"
    assert Settings.from_sources([], env={"SPACE_ID": "someone/blip2-studio"}).cache_examples == "lazy"
    on_space_but_off = Settings.from_sources(["--cache-examples", "off"], env={"SPACE_ID": "a/b"})
    assert on_space_but_off.cache_examples == "off"
    assert Settings.from_sources([], env={"BLIP2_CACHE_EXAMPLES": "lazy"}).cache_examples == "lazy"
    with pytest.raises(ValueError, match="cache_examples must be one of auto, lazy, off"):
        Settings(cache_examples="eager")
