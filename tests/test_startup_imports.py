"""Light start-up: the loading page answers before torch, transformers and Gradio are imported.

Each check runs in a fresh interpreter: this test process has imported all three long ago.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "gradio")


def run_python(code: str, timeout: float = 120) -> dict:
    """Run `code` in a fresh interpreter at the repository root; it prints one JSON line last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLIP2_") or k == "BLIP2_TINY_CACHE"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_settings_and_the_loading_page_import_none_of_torch_transformers_gradio():
    found = run_python(f"""
        import json, sys
        import app, blip2_app.config, blip2_app.errors, blip2_app.ui, blip2_app.ui.loading_page
        import blip2_app.ui.zerogpu
        print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
    """)
    assert found == []


def test_app_main_answers_on_its_port_before_the_heavy_imports():
    """app.main is stopped right after the loading server starts: at that moment the port must
    answer /healthz with 503 "loading" and none of torch, transformers, Gradio may be imported."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seen = run_python(f"""
        import json, os, sys, urllib.error, urllib.request
        from blip2_app.ui import loading_page

        start = loading_page.LoadingServer.start

        def start_then_stop(self):
            start(self)
            heavy_before = [m for m in {HEAVY!r} if m in sys.modules]
            try:
                urllib.request.urlopen("http://127.0.0.1:{port}/healthz", timeout=30)
                code, body = 200, None
            except urllib.error.HTTPError as answer:
                code, body = answer.code, json.load(answer)
            heavy_after = [m for m in {HEAVY!r} if m in sys.modules]
            print(json.dumps({{"code": code, "body": body, "heavy": heavy_before + heavy_after}}))
            sys.stdout.flush()
            os._exit(0)  # the rest of main would import torch and load the model

        loading_page.LoadingServer.start = start_then_stop
        import app

        app.main(["--model", "tiny-random", "--host", "127.0.0.1", "--port", "{port}"])
        print(json.dumps({{"code": None, "body": "main returned without starting the loading page"}}))
    """)
    assert seen["code"] == 503, seen
    assert seen["body"]["status"] == "loading" and seen["body"]["model"] == "tiny-random"
    assert seen["heavy"] == []


def test_the_ui_package_still_exports_its_names_on_first_use():
    import blip2_app.ui as ui
    from blip2_app.ui import build_demo, launch_options
    from blip2_app.ui.layout import build_demo as layout_build_demo
    from blip2_app.ui.layout import launch_options as layout_launch_options

    assert build_demo is layout_build_demo and launch_options is layout_launch_options
    with pytest.raises(AttributeError, match="no_such_name"):
        ui.no_such_name  # noqa: B018
