"""Helpers for black-box tests: start `app.py` on a free loopback port, call its queue over raw HTTP.

`gradio_client` hides what the server actually accepts (it fills defaults, uploads files, encodes
JSON strictly), so the security tests also speak Gradio's queue protocol directly: POST
`/gradio_api/queue/join`, then read the event's messages from `/gradio_api/queue/data` (SSE).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180
FILE_META = {"_type": "gradio.FileData"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningApp:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self, tail: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def rss_bytes(self) -> int:
        return rss_bytes(self.process.pid)


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of `pid` from /proc/PID/status (VmRSS now, or VmHWM: the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def app_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.update(extra or {})
    return env


def wait_until_ready(
    process: subprocess.Popen, url: str, name: str, log: Callable[[], str], timeout_s: float, every_s: float
) -> None:
    """Poll `url` until it answers 200; RuntimeError with the log tail if `process` dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not answer within {timeout_s:.0f}s:\n{log()}")
        time.sleep(every_s)


@contextlib.contextmanager
def running_app(
    log_dir: Path, args: Sequence[str] = (), env: dict[str, str] | None = None
) -> Iterator[RunningApp]:
    """`python app.py --model tiny-random --port FREE [args]`, bound to 127.0.0.1; stopped afterwards."""
    port = free_port()
    log_path = Path(log_dir) / f"app-{port}.log"
    command = [
        sys.executable,
        "app.py",
        "--model",
        "tiny-random",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=app_env(env), stdout=log, stderr=subprocess.STDOUT)
    app = RunningApp(f"http://127.0.0.1:{port}/", process, log_path)
    try:
        # "/" answers 200 with a loading page while the model loads; /healthz says 503 until ready.
        wait_until_ready(process, app.url + "healthz", "app.py", app.log, START_TIMEOUT_S, 0.3)
        yield app
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class QueueAPI:
    """Gradio's queue protocol over plain HTTP, with every parameter the caller does not give
    filled from the endpoint's documented default (as gradio_client does)."""

    def __init__(self, url: str):
        self.url = url
        config = httpx.get(url + "config", timeout=10).json()
        self.fn_index = {d["api_name"]: i for i, d in enumerate(config["dependencies"]) if d.get("api_name")}
        # Inputs the API page does not list (session state) are sent as null, as gradio_client does.
        self.input_count = {
            d["api_name"]: len(d["inputs"]) for d in config["dependencies"] if d.get("api_name")
        }
        self.info = httpx.get(url + "gradio_api/info", timeout=10).json()["named_endpoints"]

    def payload(self, api_name: str, data: Sequence[Any], session_hash: str | None = None) -> dict[str, Any]:
        params = self.info["/" + api_name]["parameters"]
        full = [*data, *(p.get("parameter_default") for p in params[len(data) :])]
        full += [None] * (self.input_count[api_name] - len(full))
        return {
            "data": full,
            "fn_index": self.fn_index[api_name],
            "session_hash": session_hash or uuid.uuid4().hex[:12],
            "event_data": None,
            "trigger_id": None,
        }

    def join(self, body: dict[str, Any] | bytes, timeout: float = 30) -> httpx.Response:
        content = (
            body if isinstance(body, bytes) else json.dumps(body).encode()
        )  # NaN allowed, as Python writes it
        return httpx.post(
            self.url + "gradio_api/queue/join",
            content=content,
            headers={"content-type": "application/json"},
            timeout=timeout,
        )

    def events(self, session_hash: str, timeout: float = 60) -> Iterator[dict[str, Any]]:
        with httpx.stream(
            "GET", self.url + "gradio_api/queue/data", params={"session_hash": session_hash}, timeout=timeout
        ) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    yield message
                    if message.get("msg") in ("process_completed", "close_stream", "unexpected_error"):
                        return

    def call(
        self, api_name: str, data: Sequence[Any], session_hash: str | None = None, timeout: float = 60
    ) -> dict[str, Any]:
        """{"ok": bool, "data": [...]} or {"ok": False, "error": text or None, "status": HTTP status}."""
        body = self.payload(api_name, data, session_hash)
        response = self.join(body, timeout=timeout)
        if response.status_code != 200:
            return {"ok": False, "status": response.status_code, "error": response.text}
        for message in self.events(body["session_hash"], timeout=timeout):
            if message.get("msg") == "process_completed":
                output = message.get("output") or {}
                if message.get("success"):
                    return {"ok": True, "status": 200, "data": output.get("data")}
                return {"ok": False, "status": 200, "error": output.get("error")}
        return {"ok": False, "status": 200, "error": "stream ended without a result"}
