"""The loading page: what the app's port answers while the model loads (standard library only).

Loading a real checkpoint takes minutes (download once, then reading 15 GB), and importing torch,
transformers and Gradio takes seconds more. `app.py` starts `LoadingServer` before any of them is
imported, so the port answers at once: a visitor sees a page naming what is loading and for how
long (it refreshes itself until the app replaces it), and a container orchestrator, the Docker
HEALTHCHECK or a load balancer polling /healthz gets 503. This module must stay free of torch,
transformers and Gradio (tests/test_startup_imports.py checks it).
"""

from __future__ import annotations

import html
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REFRESH_SECONDS = 5


class LoadingServer:
    """A stand-in on the app's port while the model loads (stdlib only: Gradio is not up yet)."""

    def __init__(self, host: str, port: int, model: str) -> None:
        self.host, self.port, self.model = host, port, model
        self.started = time.monotonic()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        """Listen in a background thread; OSError if the port cannot be had (Gradio could not either)."""
        self._server = ThreadingHTTPServer((self.host, self.port), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="loading-page", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()  # frees the port for Gradio
            self._server = None

    def status(self) -> dict[str, Any]:
        # No log lines: they name cache paths and free memory, which visitors need not see
        # (threat model, finding 10); the server log keeps them for the operator.
        return {
            "status": "loading",
            "model": self.model,
            "elapsed_seconds": round(time.monotonic() - self.started),
        }

    def page(self) -> str:
        status = self.status()
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>BLIP-2 Studio is loading</title>
<style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;padding:0 1rem;color:#1e1b4b}}
.spin{{display:inline-block;width:1em;height:1em;border:.2em solid #c7d2fe;border-top-color:#4f46e5;
border-radius:50%;animation:s 1s linear infinite;vertical-align:middle}}@keyframes s{{to{{transform:rotate(1turn)}}}}
</style></head>
<body id="loading-page"><h1><span class="spin"></span> BLIP-2 Studio is loading</h1>
<p>Loading <b>{html.escape(self.model)}</b> for {status["elapsed_seconds"]} s so far. A real checkpoint
takes a few minutes the first time (it is downloaded once, then read from the cache). This page
refreshes itself and becomes the app when the model is in.</p></body></html>"""

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/":
                    # 200: a Space shows this page to visitors instead of an error while loading.
                    self._answer(200, "text/html; charset=utf-8", server.page().encode())
                else:
                    self._answer(503, "application/json", json.dumps(server.status()).encode())

            def do_HEAD(self) -> None:
                self.do_GET()

            def _answer(self, code: int, kind: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                if code == 503:
                    self.send_header("Retry-After", str(REFRESH_SECONDS))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # polling every few seconds would flood the server log

        return Handler
